"""Secrets read from files, so that none needs to sit on a command line.

A token, a password: one line in a regular file that only its owner may
read or write (0600 or 0400, as systemd's credentials and OpenStack's
config files keep them).  Anything else is refused with a ``ConfigError``
naming the file: a secret others can read is already leaked.
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError


def read_secret(path: str, what: str) -> str:
    """The secret in PATH (surrounding whitespace dropped); WHAT names the
    setting in errors."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise ConfigError(f"{what}: cannot open {path}: {err.strerror or err}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what}: {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(f"{what}: {path} is open to others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(1 << 16)
    finally:
        os.close(fd)
    try:
        secret = raw.decode().strip()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}: {path} is not UTF-8 text") from err
    if not secret or "\n" in secret:
        raise ConfigError(f"{what}: {path} must hold one line, the secret")
    return secret
