"""The agent's client of a remote metadata service (the contract's protocol).

Every call is retried with exponential backoff and jitter while the service
is unreachable or answers 5xx, bounded by a deadline: a caller that has not
touched a disk yet fails cleanly with ``MetadataUnavailable`` when it passes.
Calls are idempotent on ``snapshot_id``, so a retry after a lost answer is
safe.  4xx answers are the service's word and are never retried.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import ssl
import time
from typing import Any
from urllib.parse import quote

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from . import metrics
from .errors import BadRequest, Unavailable
from .metadata import (
    LIMIT_FIELDS,
    CloneChange,
    CloneMeta,
    CloneNotFound,
    CloneStatus,
    Consistency,
    Finalization,
    InvalidLimits,
    InvalidMarker,
    MetadataError,
    MetadataUnavailable,
    NewClone,
    NewSnapshot,
    Origin,
    SnapshotMeta,
    SnapshotNotFound,
    Status,
    VolumeLimits,
    WrongStatus,
    check_limits,
)

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 120.0
REQUEST_TIMEOUT = 10.0


class MetadataRejected(MetadataError, BadRequest):
    """The service refused the request itself (4xx other than 404/409)."""

    code = "metadata_rejected"


class MetadataUnauthorized(MetadataError, Unavailable):
    """The service refused the agent's credentials: a configuration to fix on
    this host, not a bad request of the caller's (503)."""

    code = "metadata_unauthorized"


class _Retryable(Exception):
    """One failed attempt that another attempt may fix."""


def meta_from_dict(doc: dict[str, Any]) -> SnapshotMeta:
    return SnapshotMeta(
        id=doc["id"], volume_id=doc["volume_id"], name=doc["name"],
        description=doc["description"], size=doc["size"], created_at=doc["created_at"],
        domain=doc["domain"], group_id=doc.get("group_id"), target=doc.get("target"),
        status=Status(doc["status"]), file=doc.get("file"),
        backing_file=doc.get("backing_file"),
        consistency=Consistency(doc["consistency"]) if doc.get("consistency") else None,
        error=doc.get("error"), progress=doc.get("progress"), schedule=doc.get("schedule"),
        parent=doc.get("parent"), origin=Origin(doc.get("origin") or Origin.CREATED.value),
        domain_state=doc.get("domain_state"), memory_file=doc.get("memory_file"),
    )


def contract_parents(metas: list[SnapshotMeta]) -> dict[str, str | None]:
    """Each snapshot's previous snapshot of the same volume that did not fail,
    from a listing in the contract's order (oldest first)."""
    parents: dict[str, str | None] = {}
    last: dict[str, str] = {}
    for meta in metas:
        parents[meta.id] = last.get(meta.volume_id)
        if meta.status is not Status.ERROR:
            last[meta.volume_id] = meta.id
    return parents


def _decode(text: str, status: int) -> Any:
    """The answer's JSON.  A refusal need not be JSON (a route the service
    does not have): it is still the service's word, not a reason to retry."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        if status >= 400:
            return None
        raise


def _segment(value: str) -> str:
    """VALUE as one URL path segment: ``/`` and ``?`` stay data.  A dot
    segment would be resolved away on the way (RFC 3986), so it is refused."""
    if value in ("", ".", ".."):
        raise MetadataRejected(f"{value!r} cannot name a record", code="invalid_id")
    return quote(value, safe="")


class RemoteMetadata:
    """``MetadataService`` over HTTP: ``http(s)://HOST:PORT`` or ``unix:PATH``."""

    def __init__(self, url: str, token: str = "", deadline: float = DEFAULT_DEADLINE, *,
                 ca_file: str | None = None) -> None:
        if url.startswith("unix:"):
            self._base = "http://metadata"
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(url.removeprefix("unix:"))
        else:
            self._base = url.rstrip("/")
            # https: the service's certificate is checked, against CA_FILE
            # when given (else the system's CAs); plain http carries no TLS.
            tls = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") \
                else False
            connector = aiohttp.TCPConnector(ssl=tls)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(
            connector=connector, headers=headers,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )
        self._url = url
        self.deadline = deadline

    async def close(self) -> None:
        await self._session.close()

    # --- transport ------------------------------------------------------------

    async def _once(self, method: str, path: str, body: Any, query: dict[str, str]) -> Any:
        started = time.monotonic()
        try:
            async with self._session.request(method, self._base + path, json=body,
                                             params=query) as resp:
                status = resp.status
                text = await resp.text() if status != 204 else ""
            doc = _decode(text, status)
        except aiohttp.ClientConnectorCertificateError as err:
            # Not an outage: no retry makes an untrusted certificate trusted.
            raise MetadataUnauthorized(
                f"metadata service {self._url}: its certificate is not trusted ({err}; check "
                "[metadata] ca_file)", code="metadata_untrusted") from err
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from err
        finally:
            metrics.METADATA_LATENCY.labels(method).observe(time.monotonic() - started)
        if status >= 500:
            raise _Retryable(f"answered {status}")
        if status >= 400:
            error = (doc or {}).get("error", {}) if isinstance(doc, dict) else {}
            message = error.get("message", f"answered {status}")
            code = error.get("code")
            if status in (401, 403):
                raise MetadataUnauthorized(f"metadata service {self._url}: {message} "
                                           "(check [metadata] token)", status=status)
            # Only the protocol's own answers mean what the protocol says: a
            # 404 for something else (a volume, a path) is not "no such snapshot".
            if status == 404 and code == CloneNotFound.code:
                raise CloneNotFound(message)
            if status == 404 and code is None and path.startswith("/v1/clones"):
                raise MetadataRejected(f"metadata service {self._url} keeps no clone records "
                                       "(a gasnap metadata service of this release does)",
                                       status=status, code="clones_unsupported")
            if status == 404 and code is None and path.endswith("/limits"):
                raise MetadataRejected(f"metadata service {self._url} keeps no volume limits",
                                       status=status, code="limits_unsupported")
            if status == 404 and code in (None, SnapshotNotFound.code):
                raise SnapshotNotFound(message)
            if status == 409:  # the protocol's one conflict: a status transition
                raise WrongStatus(message, code=code or WrongStatus.code)
            if code == InvalidMarker.code:
                raise InvalidMarker(message)
            raise MetadataRejected(f"metadata service: {message}", status=status,
                                   code=code or MetadataRejected.code)
        return doc

    def _before_sleep(self, state: RetryCallState) -> None:
        metrics.METADATA_RETRIES.inc()
        failure = state.outcome.exception() if state.outcome else None
        log.warning("metadata service %s: %s; retrying (attempt %d)", self._url, failure,
                    state.attempt_number)

    async def _call(self, method: str, path: str, body: Any = None,
                    query: dict[str, str] | None = None) -> Any:
        try:
            async for attempt in AsyncRetrying(
                # Before, not after: no attempt starts past the deadline, so a
                # service back a moment later does not turn "unreachable for
                # N s" into an answer given at N + a back-off.
                stop=stop_before_delay(self.deadline),
                wait=wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.5),
                retry=retry_if_exception_type(_Retryable),
                before_sleep=self._before_sleep,
                reraise=True,
            ):
                with attempt:
                    return await self._once(method, path, body, query or {})
        except _Retryable as err:
            raise MetadataUnavailable(
                f"metadata service {self._url} unreachable for {self.deadline:.0f}s: {err}"
            ) from err
        raise AssertionError("unreachable")  # pragma: no cover

    async def _action(self, snapshot_id: str, action: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", f"/v1/snapshots/{_segment(snapshot_id)}/action",
                                {action: body})

    # --- the protocol ---------------------------------------------------------

    async def create_snapshot_metadata(self, new: NewSnapshot) -> SnapshotMeta:
        body = {"snapshot_id": new.snapshot_id, "name": new.name,
                "description": new.description, "size": new.size,
                "created_at": new.created_at, "domain": new.domain,
                "group_id": new.group_id, "target": new.target, "schedule": new.schedule,
                "parent": new.parent, "origin": new.origin.value,
                "domain_state": new.domain_state, "memory_file": new.memory_file}
        doc = await self._call("POST", f"/v1/volumes/{_segment(new.volume_id)}/action",
                               {"create-snapshot-metadata": body})
        return meta_from_dict(doc["snapshot"])

    async def finalize_snapshot_metadata(
        self, snapshot_id: str, final: Finalization
    ) -> SnapshotMeta:
        body = {"status": final.status.value, "file": final.file,
                "backing_file": final.backing_file,
                "consistency": final.consistency.value if final.consistency else None,
                "error": final.error}
        doc = await self._action(snapshot_id, "finalize-snapshot-metadata", body)
        return await self._with_parent(doc["snapshot"])

    async def update_snapshot_status(
        self, snapshot_id: str, status: Status, progress: str
    ) -> SnapshotMeta:
        doc = await self._action(snapshot_id, "update-snapshot-status",
                                 {"status": status.value, "progress": progress})
        return meta_from_dict(doc["snapshot"])

    async def update_snapshot_metadata(
        self, snapshot_id: str, name: str | None, description: str | None
    ) -> SnapshotMeta:
        body = {k: v for k, v in (("name", name), ("description", description)) if v is not None}
        doc = await self._action(snapshot_id, "update-snapshot-metadata", body)
        return meta_from_dict(doc["snapshot"])

    async def update_snapshot_files(
        self, snapshot_id: str, file: str | None, backing_file: str | None
    ) -> SnapshotMeta:
        body = {k: v for k, v in (("file", file), ("backing_file", backing_file))
                if v is not None}
        doc = await self._action(snapshot_id, "update-snapshot-files", body)
        return meta_from_dict(doc["snapshot"])

    async def snapshot_delete_metadata(self, snapshot_id: str) -> None:
        await self._action(snapshot_id, "snapshot-delete-metadata", {})

    # --- clones ---------------------------------------------------------------

    async def create_clone_metadata(self, new: NewClone) -> CloneMeta:
        body = {"clone_id": new.clone_id, "name": new.name, "mode": new.mode.value,
                "file": new.file, "image": new.image, "size": new.size,
                "created_at": new.created_at}
        doc = await self._action(new.source_snapshot, "create-clone-metadata", body)
        return CloneMeta.from_dict(doc["clone"])

    async def _clone_action(self, clone_id: str, action: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", f"/v1/clones/{_segment(clone_id)}/action",
                                {action: body})

    async def finalize_clone_metadata(self, clone_id: str, status: CloneStatus,
                                      error: str | None = None) -> CloneMeta:
        doc = await self._clone_action(clone_id, "finalize-clone-metadata",
                                       {"status": status.value, "error": error})
        return CloneMeta.from_dict(doc["clone"])

    async def update_clone_metadata(self, clone_id: str, change: CloneChange) -> CloneMeta:
        body: dict[str, Any] = {}
        if change.status is not None:
            body["status"] = change.status.value
        if change.mode is not None:
            body["mode"] = change.mode.value
        if change.detach:
            body["attached_to"] = None
        elif change.attached_to is not None:
            body["attached_to"] = change.attached_to.to_dict()
        if change.error is not None:
            body["error"] = change.error
        doc = await self._clone_action(clone_id, "update-clone-metadata", body)
        return CloneMeta.from_dict(doc["clone"])

    async def clone_delete_metadata(self, clone_id: str) -> None:
        await self._clone_action(clone_id, "clone-delete-metadata", {})

    async def get_clone(self, clone_id: str) -> CloneMeta:
        try:
            doc = await self._call("GET", f"/v1/clones/{_segment(clone_id)}")
        except MetadataRejected as err:
            if err.code != "clones_unsupported":
                raise
            raise CloneNotFound(f"no clone {clone_id}: {err.message}") from err
        return CloneMeta.from_dict(doc["clone"])

    async def list_clones(self, snapshot_id: str | None = None,
                          volume_id: str | None = None) -> list[CloneMeta]:
        given = {"snapshot_id": snapshot_id, "volume_id": volume_id}
        try:
            doc = await self._call("GET", "/v1/clones",
                                   query={k: v for k, v in given.items() if v is not None})
        except MetadataRejected as err:
            if err.code != "clones_unsupported":
                raise
            return []  # a service of the contract alone: no clone was ever recorded there
        return [CloneMeta.from_dict(d) for d in doc["clones"]]

    # --- limits ---------------------------------------------------------------

    async def get_volume_limits(self, volume_id: str) -> VolumeLimits:
        try:
            doc = await self._call("GET", f"/v1/volumes/{_segment(volume_id)}/limits")
        except MetadataRejected as err:
            if err.code != "limits_unsupported":
                raise
            return VolumeLimits()  # a service of the contract alone: nothing was ever set
        return VolumeLimits(**{k: doc["limits"].get(k) for k in LIMIT_FIELDS})

    async def update_volume_limits(self, volume_id: str,
                                   change: dict[str, Any]) -> VolumeLimits:
        try:
            doc = await self._call("POST", f"/v1/volumes/{_segment(volume_id)}/action",
                                   {"update-volume-limits": check_limits(change)})
        except (MetadataRejected, SnapshotNotFound) as err:
            # (a bare 404 here is the route missing: there is no snapshot in it)
            if err.code == InvalidLimits.code:
                raise InvalidLimits(err.message) from err
            raise MetadataRejected(
                f"metadata service {self._url} refused to keep volume limits ({err.message}; "
                "a gasnap metadata service of this release keeps them)",
                code="limits_unsupported") from err
        return VolumeLimits(**{k: doc["limits"].get(k) for k in LIMIT_FIELDS})

    # --- reads ----------------------------------------------------------------

    async def get_snapshot(self, snapshot_id: str) -> SnapshotMeta:
        return await self._with_parent(
            (await self._call("GET", f"/v1/snapshots/{_segment(snapshot_id)}"))["snapshot"])

    async def _with_parent(self, doc: dict[str, Any]) -> SnapshotMeta:
        meta = meta_from_dict(doc)
        if "parent" in doc:
            return meta
        # A contract-only service: the parent comes from the volume's listing.
        volume = await self._contract_listing(meta.volume_id, None, None, None, None)
        return next((m for m in volume if m.id == meta.id), meta)

    async def list_snapshots(
        self, volume_id: str | None = None, status: Status | None = None, *,
        domain: str | None = None, limit: int | None = None, marker: str | None = None,
        parent: str | None = None, roots: bool = False, group_id: str | None = None,
    ) -> list[SnapshotMeta]:
        given = {"volume_id": volume_id, "status": status.value if status else None,
                 "domain": domain, "limit": None if limit is None else str(limit),
                 "marker": marker, "parent": parent, "roots": "true" if roots else None,
                 "group_id": group_id}
        query = {k: v for k, v in given.items() if v is not None}
        doc = await self._call("GET", "/v1/snapshots", query=query)
        docs = doc["snapshots"]
        if all("parent" in d for d in docs):
            return [meta_from_dict(d) for d in docs]
        # A service that keeps to the contract alone: no parents, and the
        # other filters may have been ignored.  Work them out here, from the
        # contract's own listing.
        metas = await self._contract_listing(volume_id, status, domain, None, None)
        metas = [m for m in metas if (parent is None or m.parent == parent)
                 and (not roots or m.parent is None)
                 and (group_id is None or m.group_id == group_id)]
        return _page(metas, limit, marker)

    async def _contract_listing(
        self, volume_id: str | None, status: Status | None, domain: str | None,
        limit: int | None, marker: str | None,
    ) -> list[SnapshotMeta]:
        query = {"volume_id": volume_id} if volume_id is not None else {}
        everything = [meta_from_dict(d) for d in
                      (await self._call("GET", "/v1/snapshots", query=query))["snapshots"]]
        parents = contract_parents(everything)
        metas = [dataclasses.replace(m, parent=parents[m.id]) for m in everything
                 if (status is None or m.status is status)
                 and (domain is None or m.domain == domain)]
        return _page(metas, limit, marker)


def _page(metas: list[SnapshotMeta], limit: int | None,
          marker: str | None) -> list[SnapshotMeta]:
    if marker is not None:
        ids = [m.id for m in metas]
        if marker not in ids:
            raise InvalidMarker(f"marker {marker} is not a snapshot id")
        metas = metas[ids.index(marker) + 1:]
    return metas if limit is None else metas[:limit]
