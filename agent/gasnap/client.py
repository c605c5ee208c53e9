"""A small client for the agent's HTTP API, standard library only.

The CLI's request path must stay on light imports (``import aiohttp`` alone
costs about 200 ms), so this speaks HTTP/1.1 with ``http.client`` over the
agent's unix socket or TCP.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlsplit

from .errors import BadRequest, GasnapError, Unavailable

DEFAULT_API = "unix:/run/gasnap/api.sock"
TIMEOUT = 30.0


class ApiError(GasnapError):
    """An error answer of the agent, carrying the agent's own code."""


class AgentUnreachable(ApiError, Unavailable):
    code = "agent_unreachable"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ApiClient:
    def __init__(self, api: str = DEFAULT_API, token: str | None = None,
                 timeout: float = TIMEOUT) -> None:
        self.api = api
        self.token = token
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.api.startswith("unix:"):
            return _UnixConnection(self.api.removeprefix("unix:"), self.timeout)
        url = urlsplit(self.api)
        if url.scheme == "https":
            return http.client.HTTPSConnection(url.netloc, timeout=self.timeout)
        if url.scheme == "http":
            return http.client.HTTPConnection(url.netloc, timeout=self.timeout)
        raise BadRequest(f"--api must be unix:PATH or http(s)://HOST:PORT, not {self.api!r}")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return _decode(*self.raw(method, path, body))

    def text(self, path: str) -> str:
        """A GET whose answer is not JSON (``/metrics``)."""
        status, raw = self.raw("GET", path)
        if status >= 400:
            _decode(status, raw)
        return raw.decode()

    def raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection()
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except OSError as err:
            raise AgentUnreachable(f"cannot reach the gasnap agent at {self.api}: {err}") from err
        finally:
            conn.close()
        return response.status, raw

    def get(self, path: str) -> Any:
        return self.request("GET", path)


def _decode(status: int, raw: bytes) -> Any:
    try:
        doc = json.loads(raw) if raw else None
    except ValueError as err:
        raise ApiError(f"agent answered {status} with non-JSON body") from err
    if status < 400:
        return doc
    error = doc.get("error", {}) if isinstance(doc, dict) else {}
    raise ApiError(str(error.get("message", f"HTTP {status}")),
                   code=str(error.get("code", "http_error")), status=status)
