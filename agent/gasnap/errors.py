"""One exception root for everything gasnap raises on purpose.

Every error carries a stable machine ``code`` (the ``error.code`` of the HTTP
API and of ``--json`` output) and a human message.  The category mixins say
how a caller should react; the HTTP layer maps them to status codes and
nothing else needs to know about HTTP.  Each boundary module (libvirt, guest
agent, qemu-img, metadata) defines its own subclasses next to its code.
"""

from __future__ import annotations

# typing is imported for the type checker only: the CLI's request path counts
# every import, and annotations are never evaluated (``from __future__ import
# annotations``), so mypy and ruff still see it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class GasnapError(Exception):
    """Root of all gasnap errors."""

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


# Categories: how the caller should react (and what the API answers).


class NotFound(GasnapError):
    """Unknown domain, volume, snapshot or task (404)."""

    code = "not_found"


class BadRequest(GasnapError):
    """The request itself is wrong (400)."""

    code = "bad_request"


class Conflict(GasnapError):
    """Valid request, wrong moment: busy volume, wrong status (409)."""

    code = "conflict"


class Unavailable(GasnapError):
    """A service gasnap depends on cannot be reached (503)."""

    code = "unavailable"


class InsufficientStorage(GasnapError):
    """The host's filesystems cannot hold what the request needs (507)."""

    code = "insufficient_storage"


class NotSupported(GasnapError):
    """This hypervisor backend cannot do what was asked; the message says
    why (501): the request is valid, and another backend may serve it."""

    code = "not_supported_on_backend"


class ConfigError(GasnapError):
    """The configuration file or command line is invalid."""

    code = "config"


class HostIOError(GasnapError):
    """The host refused a file operation (create, chown, link, unlink, ...)."""

    code = "host_io"


def from_os_error(err: OSError) -> GasnapError:
    """ERR as a caller should see it: what the host refused, the errno by
    name, the file; a full filesystem is ``insufficient_space`` (507)."""
    import errno  # noqa: PLC0415 (the CLI's request path never needs it)

    name = errno.errorcode.get(err.errno or 0, "")
    text = f"{err.strerror or err}" + (f" ({name})" if name else "")
    if err.filename:
        text += f": {err.filename}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"the host's filesystem is full: {text}",
                                   code="insufficient_space")
    if err.errno == errno.ENAMETOOLONG:
        return HostIOError(text, code="name_too_long")
    return HostIOError(text)

