"""A small client for the agent's HTTP API, standard library only.

The CLI's request path must stay on light imports: ``import aiohttp`` alone
costs more than a whole snapshot request, and even ``http.client`` a large
share of one (it pulls in the ``email`` parser and ``ssl``; see
docs/benchmarks.md for the measured figures).  So
plain HTTP/1.1 (unix socket or TCP) is spoken over a bare socket, one request
per connection; only ``https://`` falls back to ``http.client``.
"""

from __future__ import annotations

import json
import socket

from .errors import BadRequest, GasnapError, Unavailable

# typing for the type checker only, as in gasnap.errors (the CLI's imports stay light)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_API = "unix:/run/gasnap/api.sock"
TIMEOUT = 30.0
WAIT_SLICE = 20  # seconds per long-poll of a task, under TIMEOUT
MAX_ANSWER = 256 << 20  # a listing of every record stays far below this


class ApiError(GasnapError):
    """An error answer of the agent, carrying the agent's own code."""


class AgentUnreachable(ApiError, Unavailable):
    code = "agent_unreachable"


class MalformedAnswer(ApiError):
    code = "malformed_answer"


class ApiClient:
    def __init__(self, api: str = DEFAULT_API, token: str | None = None,
                 timeout: float = TIMEOUT, ca_file: str | None = None) -> None:
        self.api = api
        self.token = token
        self.timeout = timeout
        self.ca_file = ca_file  # https: the CAs to check the agent against (else the system's)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return _decode(*self.raw(method, path, body))

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def wait_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """TASK (as the API answered it) once it has ended, by long-polls."""
        while task["state"] in ("queued", "running"):
            task = self.get(f"/v1/tasks/{task['id']}?wait={WAIT_SLICE}")
        return task

    def text(self, path: str) -> str:
        """A GET whose answer is not JSON (``/metrics``)."""
        status, raw = self.raw("GET", path)
        if status >= 400:
            _decode(status, raw)
        return raw.decode()

    def raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            if self.api.startswith("https://"):
                return self._https(method, path, payload, headers)
            sock, host = self._connect()
            with sock:
                sock.sendall(_request_bytes(method, path, host, headers, payload))
                return _parse_answer(_read_all(sock))
        except OSError as err:
            raise AgentUnreachable(f"cannot reach the gasnap agent at {self.api}: {err}") from err

    # --- transports -------------------------------------------------------------

    def _connect(self) -> tuple[socket.socket, str]:
        if self.api.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.api.removeprefix("unix:"))
            except OSError:
                sock.close()
                raise
            return sock, "localhost"
        if self.api.startswith("http://"):
            netloc = self.api.removeprefix("http://").split("/", 1)[0]
            return socket.create_connection(_host_port(netloc, 80), self.timeout), netloc
        raise BadRequest(f"--api must be unix:PATH or http(s)://HOST:PORT, not {self.api!r}")

    def _https(self, method: str, path: str, payload: bytes,
               headers: dict[str, str]) -> tuple[int, bytes]:
        # TLS needs ssl and certificate handling: http.client earns its cost here.
        import http.client  # noqa: PLC0415
        import ssl  # noqa: PLC0415

        netloc = self.api.removeprefix("https://").split("/", 1)[0]
        context = ssl.create_default_context(cafile=self.ca_file)
        conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=context)
        try:
            conn.request(method, path, body=payload or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


# --- HTTP/1.1 on the wire ------------------------------------------------------------


def _host_port(netloc: str, default: int) -> tuple[str, int]:
    if netloc.startswith("["):  # [IPv6]:PORT
        host, _, rest = netloc[1:].partition("]")
        port = rest.removeprefix(":")
    elif netloc.count(":") == 1:
        host, _, port = netloc.partition(":")
    else:
        host, port = netloc, ""
    if not port:
        return host, default
    if not port.isdigit():
        raise BadRequest(f"--api has a bad port: {netloc!r}")
    return host, int(port)


def _request_bytes(method: str, path: str, host: str, headers: dict[str, str],
                   payload: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
             f"Content-Length: {len(payload)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def _read_all(sock: socket.socket) -> bytes:
    """The whole answer: the agent closes the connection after it
    (``Connection: close``)."""
    chunks: list[bytes] = []
    size = 0
    while data := sock.recv(1 << 16):
        chunks.append(data)
        size += len(data)
        if size > MAX_ANSWER:
            raise MalformedAnswer(f"answer larger than {MAX_ANSWER} bytes")
    return b"".join(chunks)


def _parse_answer(answer: bytes) -> tuple[int, bytes]:
    head, sep, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1.") \
            or not parts[1].isdigit():
        raise MalformedAnswer(f"not an HTTP answer: {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif (length := headers.get("content-length", "")).isdigit():
        if len(body) < int(length):
            raise MalformedAnswer(f"answer cut short: {len(body)} of {length} bytes")
        body = body[:int(length)]
    return int(parts[1]), body


def _dechunk(body: bytes) -> bytes:
    out: list[bytes] = []
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError as err:
            raise MalformedAnswer("bad chunk size in the answer") from err
        if not sep or len(rest) < size:
            raise MalformedAnswer("answer cut short inside a chunk")
        if size == 0:
            return b"".join(out)
        out.append(rest[:size])
        body = rest[size + 2:]


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
