"""Agent settings: defaults, then the TOML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cinder import CinderSettings
from .errors import ConfigError
from .metadata import InvalidLimits, Limits, check_limits
from .quiesce import VALUES as QUIESCE_VALUES
from .quiesce import Quiesce
from .secretfile import read_secret

DEFAULT_CONFIG = Path("/etc/gasnap/agent.toml")


SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a systemd instance name


@dataclass(frozen=True)
class Schedule:
    """``[schedules.NAME]``: one group snapshot of DOMAINS per run, then keep
    the newest KEEP snapshots of this schedule per volume."""

    name: str
    domains: tuple[str, ...]
    keep: int
    quiesce: Quiesce = Quiesce.PREFERRED


@dataclass(frozen=True)
class Settings:
    # the unix socket for timers and local tools, TCP for Nova-style callers
    listen: tuple[str, ...] = ("unix:/run/gasnap/api.sock",)
    state_dir: Path = Path("/var/lib/gasnap")
    hypervisor: str = "libvirt"  # or "qmp": bare QEMU processes found in qmp_run_dir
    libvirt_uri: str = "qemu:///system"
    qmp_run_dir: Path = Path("/run/gasnap/qemu")  # NAME.qmp and NAME.qga of each guest
    token: str = ""  # required on TCP; token_file reads it from a root-only file
    tls_cert: str = ""  # PEM: TCP listeners speak TLS with it and tls_key
    tls_key: str = ""
    freeze_timeout: float = 10.0
    merge_bandwidth: int = 0  # MiB/s for live merges; 0: as fast as the disks go
    # seconds an active commit may go without the bytes it has left to copy
    # reaching a new low before it is given up (the guest writes faster than
    # it copies): the job is cancelled, the chain stays as it was
    merge_converge_timeout: float = 600.0
    # seconds a live merge's follower waits for libvirtd before handing the
    # merge to the sweep (QEMU goes on with the job meanwhile)
    libvirt_outage_wait: float = 120.0
    # seconds between two looks at operations a workflow handed over
    # (a service was away) or recovery could not settle yet
    sweep_interval: float = 10.0
    # seconds a forced revert waits for a guest to power off before it
    # destroys the domain
    shutdown_timeout: float = 120.0
    detach_timeout: float = 60.0  # a clone's detach: the wait for the guest to let go
    limits_min_free_mib: int = 256  # free space a create or merge must leave behind
    # every volume's limits unless it has its own (``gasnap volume limits``)
    limits_max_snapshots: int = Limits.max_snapshots
    limits_soft_limit_percent: int = Limits.soft_limit_percent
    limits_auto_delete: bool = Limits.auto_delete
    limits_max_chain_depth: int = Limits.max_chain_depth
    spare_overlays: bool = True  # make the next snapshot's overlay ahead of time
    metadata_url: str = ""  # empty: the embedded store under state_dir
    metadata_token: str = ""
    metadata_ca_file: str = ""  # PEM: the CAs an https metadata service is checked against
    metadata_deadline: float = 120.0  # seconds a metadata call may keep retrying
    schedules: dict[str, Schedule] = dataclasses.field(default_factory=dict)
    cinder: CinderSettings | None = None  # [cinder]: report Nova-style calls back to Cinder

    def __post_init__(self) -> None:
        if isinstance(self.listen, str):  # one address, as callers may give it
            object.__setattr__(self, "listen", (self.listen,))

    @property
    def limits(self) -> Limits:
        return Limits(self.limits_max_snapshots, self.limits_soft_limit_percent,
                      self.limits_auto_delete, self.limits_max_chain_depth)

    def __repr__(self) -> str:  # never print secrets
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for secret in ("token", "metadata_token"):
            if fields[secret]:
                fields[secret] = "***"
        return f"Settings({fields})"


HYPERVISORS = ("libvirt", "qmp")

_AGENT_KEYS: dict[str, type | tuple[type, ...]] = {
    "listen": (str, list), "state_dir": str, "hypervisor": str, "libvirt_uri": str,
    "token": str,
    "token_file": str, "tls_cert": str, "tls_key": str,
    "freeze_timeout": (int, float), "merge_bandwidth": int, "spare_overlays": bool,
    "merge_converge_timeout": (int, float),
    "libvirt_outage_wait": (int, float), "shutdown_timeout": (int, float),
    "detach_timeout": (int, float), "sweep_interval": (int, float),
}
_QMP_KEYS: dict[str, type | tuple[type, ...]] = {"run_dir": str}
_LIMITS_KEYS: dict[str, type | tuple[type, ...]] = {
    "min_free_mib": int, "max_snapshots": int, "soft_limit_percent": int,
    "auto_delete": bool, "max_chain_depth": int,
}
_METADATA_KEYS: dict[str, type | tuple[type, ...]] = {
    "url": str, "token": str, "token_file": str, "ca_file": str, "deadline": (int, float),
}


def _checked(section: str, table: Any, keys: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"unknown key {section}.{key}")
        expected = keys[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{section}.{key} has the wrong type ({type(value).__name__})")
    return dict(table)


_CINDER_KEYS: dict[str, type | tuple[type, ...]] = {
    f.name: str for f in dataclasses.fields(CinderSettings)
}
_SCHEDULE_KEYS: dict[str, type | tuple[type, ...]] = {
    "domains": list, "keep": int, "quiesce": str,
}


def _schedules(doc: Any) -> dict[str, Schedule]:
    if not isinstance(doc, dict):
        raise ConfigError("[schedules] must hold tables [schedules.NAME]")
    schedules = {}
    for name, table in doc.items():
        where = f"schedules.{name}"
        if not SCHEDULE_NAME.match(name):
            raise ConfigError(f"{where}: a schedule name is letters, digits, '_', '.', '-'")
        values = _checked(where, table, _SCHEDULE_KEYS)
        for key in ("domains", "keep"):
            if key not in values:
                raise ConfigError(f"{where}.{key} is required")
        domains = values["domains"]
        if not domains or not all(isinstance(d, str) and d for d in domains):
            raise ConfigError(f"{where}.domains must be a non-empty list of domain names")
        if len(set(domains)) != len(domains):
            raise ConfigError(f"{where}.domains names a domain twice")
        if values["keep"] < 1:
            raise ConfigError(f"{where}.keep must be at least 1")
        quiesce = values.get("quiesce", Quiesce.PREFERRED.value)
        if quiesce not in QUIESCE_VALUES:
            raise ConfigError(f"{where}.quiesce must be one of {', '.join(QUIESCE_VALUES)}")
        schedules[name] = Schedule(name, tuple(domains), values["keep"], Quiesce(quiesce))
    return schedules


def missing_domains(settings: Settings, known: list[str]) -> list[str]:
    """What is wrong with the schedules' domains (KNOWN: libvirt's domains):
    one line for each a schedule names that does not exist."""
    where = (f"qmp:{settings.qmp_run_dir}" if settings.hypervisor == "qmp"
             else settings.libvirt_uri)
    return [f"schedules.{schedule.name}.domains: no domain {name!r} on {where}"
            for schedule in settings.schedules.values()
            for name in schedule.domains if name not in known]


def _read(file: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{file}: {err}") from err
    unknown = set(doc) - {"agent", "metadata", "schedules", "limits", "cinder", "qmp"}
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}]")
    values = _checked("agent", doc.get("agent", {}), _AGENT_KEYS)
    meta = _checked("metadata", doc.get("metadata", {}), _METADATA_KEYS)
    values.update({f"metadata_{k}": v for k, v in meta.items()})
    qmp = _checked("qmp", doc.get("qmp", {}), _QMP_KEYS)
    values.update({f"qmp_{k}": v for k, v in qmp.items()})
    limits = _checked("limits", doc.get("limits", {}), _LIMITS_KEYS)
    for key, value in limits.items():  # the ranges a volume's own limits keep to
        try:
            check_limits({key: value} if key != "min_free_mib" else {})
        except InvalidLimits as err:
            raise ConfigError(f"limits.{key}: {err.message}") from err
    values.update({f"limits_{k}": v for k, v in limits.items()})
    values["schedules"] = _schedules(doc.get("schedules", {}))
    if "cinder" in doc:
        cinder = _checked("cinder", doc["cinder"], _CINDER_KEYS)
        if "url" not in cinder:
            raise ConfigError("cinder.url is required")
        values["cinder"] = CinderSettings(**cinder)
        values["cinder"].check()
    return values


def _positive(values: dict[str, Any], key: str, name: str) -> None:
    if key in values:
        values[key] = float(values[key])
        # not (x > 0): nan and inf would pass a plain comparison, and a nan
        # timeout breaks the event loop's timer heap
        if not (math.isfinite(values[key]) and values[key] > 0):
            raise ConfigError(f"{name} must be a positive number")


def load(path: Path | None, overrides: dict[str, Any]) -> Settings:
    """Settings from PATH (absent default file: defaults) with OVERRIDES on top.

    OVERRIDES holds only the flags that were given (None-valued ones are ignored).
    """
    values: dict[str, Any] = {}
    file = path or DEFAULT_CONFIG
    if file.exists():
        values = _read(file)
    elif path is not None:
        raise ConfigError(f"config file {path} does not exist")
    given = {k: v for k, v in overrides.items() if v is not None}
    if {"token", "token_file"} & set(given):  # the command line's secret wins whole
        values.pop("token", None)
        values.pop("token_file", None)
    values.update(given)
    for key in ("state_dir", "qmp_run_dir"):
        if key in values:
            values[key] = Path(values[key])
    if values.get("hypervisor", "libvirt") not in HYPERVISORS:
        raise ConfigError(f"agent.hypervisor must be one of {', '.join(HYPERVISORS)}, "
                          f"not {values['hypervisor']!r}")
    _positive(values, "freeze_timeout", "agent.freeze_timeout")
    _positive(values, "metadata_deadline", "metadata.deadline")
    _positive(values, "libvirt_outage_wait", "agent.libvirt_outage_wait")
    _positive(values, "shutdown_timeout", "agent.shutdown_timeout")
    _positive(values, "detach_timeout", "agent.detach_timeout")
    _positive(values, "sweep_interval", "agent.sweep_interval")
    _positive(values, "merge_converge_timeout", "agent.merge_converge_timeout")
    url = values.get("metadata_url", "")
    if url and not url.startswith(("http://", "https://", "unix:")):
        raise ConfigError(f"metadata.url must be http(s)://HOST:PORT or unix:PATH, not {url!r}")
    if values.get("merge_bandwidth", 0) < 0:
        raise ConfigError("agent.merge_bandwidth must not be negative")
    if values.get("limits_min_free_mib", 0) < 0:
        raise ConfigError("limits.min_free_mib must not be negative")
    values["listen"] = _listen(values.get("listen", Settings.listen))
    _secret(values, "token", "agent")
    _secret(values, "metadata_token", "metadata")
    settings = Settings(**values)
    if any(a.startswith("tcp:") for a in settings.listen) and not settings.token:
        raise ConfigError("listening on TCP needs a token (agent.token_file, --token-file "
                          "or agent.token)")
    _check_tls(settings)
    return settings


def _listen(value: Any) -> tuple[str, ...]:
    """``listen``: one address or a list of them, each unix:PATH or tcp:HOST:PORT."""
    addresses = [value] if isinstance(value, str) else list(value)
    if not addresses or not all(isinstance(a, str) for a in addresses):
        raise ConfigError("agent.listen must be an address or a list of addresses")
    for address in addresses:
        if not address.startswith(("unix:", "tcp:")):
            raise ConfigError(f"listen must be unix:PATH or tcp:HOST:PORT, not {address!r}")
    if len(set(addresses)) != len(addresses):
        raise ConfigError("agent.listen names an address twice")
    return tuple(addresses)


def _secret(values: dict[str, Any], key: str, section: str) -> None:
    """KEY from KEY_file (a root-only file) when that is given; not both."""
    path = values.pop(f"{key}_file", "")
    if not path:
        return
    if values.get(key):
        raise ConfigError(f"{section}: give the token or its token_file, not both")
    values[key] = read_secret(path, f"{section}.token_file")


def _check_tls(settings: Settings) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("agent.tls_cert and agent.tls_key go together")
    if settings.tls_cert and not any(a.startswith("tcp:") for a in settings.listen):
        raise ConfigError("agent.tls_cert: TLS is for TCP listeners, and none is configured")
    for key in ("tls_cert", "tls_key", "metadata_ca_file"):
        path = getattr(settings, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key.replace('metadata_', 'metadata.')}: no file {path}")
