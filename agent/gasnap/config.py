"""Agent settings: defaults, then the TOML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG = Path("/etc/gasnap/agent.toml")


@dataclass(frozen=True)
class Settings:
    listen: str = "unix:/run/gasnap/api.sock"
    state_dir: Path = Path("/var/lib/gasnap")
    libvirt_uri: str = "qemu:///system"
    token: str = ""
    freeze_timeout: float = 10.0
    merge_bandwidth: int = 0  # MiB/s for live merges; 0: as fast as the disks go
    metadata_url: str = ""  # empty: the embedded store under state_dir
    metadata_token: str = ""
    metadata_deadline: float = 120.0  # seconds a metadata call may keep retrying

    def __repr__(self) -> str:  # never print secrets
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for secret in ("token", "metadata_token"):
            if fields[secret]:
                fields[secret] = "***"
        return f"Settings({fields})"


_AGENT_KEYS: dict[str, type | tuple[type, ...]] = {
    "listen": str, "state_dir": str, "libvirt_uri": str, "token": str,
    "freeze_timeout": (int, float), "merge_bandwidth": int,
}
_METADATA_KEYS: dict[str, type | tuple[type, ...]] = {
    "url": str, "token": str, "deadline": (int, float),
}


def _checked(section: str, table: Any, keys: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"unknown key {section}.{key}")
        expected = keys[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ConfigError(f"{section}.{key} has the wrong type ({type(value).__name__})")
    return dict(table)


def load(path: Path | None, overrides: dict[str, Any]) -> Settings:
    """Settings from PATH (absent default file: defaults) with OVERRIDES on top.

    OVERRIDES holds only the flags that were given (None-valued ones are ignored).
    """
    values: dict[str, Any] = {}
    file = path or DEFAULT_CONFIG
    if file.exists():
        try:
            doc = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{file}: {err}") from err
        values.update(_checked("agent", doc.get("agent", {}), _AGENT_KEYS))
        meta = _checked("metadata", doc.get("metadata", {}), _METADATA_KEYS)
        values.update({f"metadata_{k}": v for k, v in meta.items()})
    elif path is not None:
        raise ConfigError(f"config file {path} does not exist")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "state_dir" in values:
        values["state_dir"] = Path(values["state_dir"])
    if "freeze_timeout" in values:
        values["freeze_timeout"] = float(values["freeze_timeout"])
        if values["freeze_timeout"] <= 0:
            raise ConfigError("agent.freeze_timeout must be positive")
    if "metadata_deadline" in values:
        values["metadata_deadline"] = float(values["metadata_deadline"])
        if values["metadata_deadline"] <= 0:
            raise ConfigError("metadata.deadline must be positive")
    url = values.get("metadata_url", "")
    if url and not url.startswith(("http://", "https://", "unix:")):
        raise ConfigError(f"metadata.url must be http(s)://HOST:PORT or unix:PATH, not {url!r}")
    if values.get("merge_bandwidth", 0) < 0:
        raise ConfigError("agent.merge_bandwidth must not be negative")
    settings = Settings(**values)
    if settings.listen.startswith("tcp:") and not settings.token:
        raise ConfigError("listening on TCP needs a token (--token or agent.token)")
    if not settings.listen.startswith(("unix:", "tcp:")):
        raise ConfigError(f"listen must be unix:PATH or tcp:HOST:PORT, not {settings.listen!r}")
    return settings
