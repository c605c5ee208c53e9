"""Prometheus metrics of the agent (``GET /metrics``) and of the metadata
service.  Each has its own registry so neither exports the other's series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

AGENT = CollectorRegistry()

SNAPSHOTS = Counter(
    "gasnap_snapshots", "Snapshots finalized, by outcome and consistency",
    ["status", "consistency"], registry=AGENT,
)
FREEZE_SECONDS = Histogram(
    "gasnap_freeze_duration_seconds", "Time guests stayed frozen for one snapshot",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=AGENT,
)
MERGE_SECONDS = Histogram(
    "gasnap_merge_duration_seconds", "Duration of chain merges (snapshot deletes)",
    ["method"], buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600), registry=AGENT,
)
MERGE_BYTES = Counter(
    "gasnap_merge_bytes", "Bytes merged by snapshot deletes", ["method"], registry=AGENT,
)
TASKS = Gauge("gasnap_tasks", "Tasks known to the agent, by kind and state",
              ["kind", "state"], registry=AGENT)
METADATA_LATENCY = Histogram(
    "gasnap_metadata_call_duration_seconds", "Calls to the remote metadata service",
    ["method"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 10), registry=AGENT,
)
METADATA_RETRIES = Counter(
    "gasnap_metadata_retries", "Calls to the metadata service that were retried",
    registry=AGENT,
)
SPARES_PENDING = Gauge(
    "gasnap_spares_pending", "Spare overlays being made in the background", registry=AGENT,
)
GUEST_AGENT_FAILURES = Counter(
    "gasnap_guest_agent_failures", "Guest-agent commands that failed, by command and error",
    ["command", "code"], registry=AGENT,
)
DOMAIN_IO_ERRORS = Counter(
    "gasnap_domain_io_errors", "I/O errors QEMU reported on domains' disks, by domain and "
    "reason (enospc: the filesystem under the disk is full; the guest is paused)",
    ["domain", "reason"], registry=AGENT,
)
VOLUME_SNAPSHOTS = Gauge(
    "gasnap_volume_snapshots", "Snapshots a volume has (failed creates aside), as of the "
    "last change this agent made to it", ["volume_id"], registry=AGENT,
)
VOLUME_SNAPSHOT_LIMIT = Gauge(
    "gasnap_volume_snapshot_limit", "A volume's max_snapshots (its own, else [limits])",
    ["volume_id"], registry=AGENT,
)
CINDER_UPDATES = Counter(
    "gasnap_cinder_updates", "os-update_snapshot_status calls to Cinder, by status and "
    "outcome (delivered, refused)", ["status", "outcome"], registry=AGENT,
)
CINDER_PENDING = Gauge(
    "gasnap_cinder_updates_pending", "Reports to Cinder not delivered yet (outcome known "
    "or not)", registry=AGENT,
)

SERVICE = CollectorRegistry()

SERVICE_REQUESTS = Counter(
    "gasnap_metadata_requests", "Requests served by the metadata service",
    ["call", "status"], registry=SERVICE,
)
