"""Both services' OpenAPI documents: valid, complete (every route has an
entry), and true (schemathesis: no 5xx, no answer outside the document)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Agent, running_agent
from gasnap.api import spec as agent_spec
from gasnap.api.app import create_app as agent_app
from gasnap.config import Settings
from gasnap.metaserver import spec as service_spec
from gasnap.metaserver.app import ServiceSettings
from gasnap.metaserver.app import create_app as service_app
from gasnap.openapi import Schema, routes_missing
from metaservice import TOKEN, MetadataServer

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


def _apps() -> list[tuple[web.Application, Schema]]:
    return [
        (agent_app(Settings(listen="tcp:127.0.0.1:0", token="t", libvirt_uri="test:///default")),
         agent_spec.SPEC),
        (service_app(ServiceSettings(listen="tcp:127.0.0.1:0", token="t")), service_spec.SPEC),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["agent", "metadata-service"])
def test_documents_are_valid_and_complete(which: int) -> None:
    app, spec = _apps()[which]
    validate(spec)
    assert routes_missing(app, spec) == []


def test_a_route_without_an_entry_is_caught() -> None:
    app, spec = _apps()[1]

    async def extra(_request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/undocumented", extra)
    assert routes_missing(app, spec) == ["GET /v1/undocumented"]


# --- the metadata service, fuzzed -------------------------------------------------


@pytest.fixture(scope="module")
def meta_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataServer]:
    base = tmp_path_factory.mktemp("fuzz-meta")
    server = MetadataServer(f"sqlite:///{base}/meta.db", base / "service.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def meta_schema(meta_server: MetadataServer) -> schemathesis.BaseSchema:
    served = requests.get(f"{meta_server.url}/openapi.json", timeout=10).json()
    assert served == service_spec.SPEC
    return schemathesis.openapi.from_url(f"{meta_server.url}/openapi.json")


def operations(spec: Schema) -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, entry in spec["paths"].items() for method in entry]


def fuzz(schema: schemathesis.BaseSchema, method: str, path: str, headers: dict[str, str]
         ) -> None:
    """Bounded examples of one operation, each answer checked against the document."""
    operation = schema[path][method]
    statuses: list[int] = []

    @given(case=operation.as_strategy())
    @FUZZ
    def one(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        statuses.append(response.status_code)

    one()
    # The token was accepted, so the examples reached the handlers.
    assert statuses and 401 not in statuses, statuses


@pytest.mark.parametrize(("method", "path"), operations(service_spec.SPEC))
def test_metadata_service_answers_within_its_document(
    meta_schema: schemathesis.BaseSchema, method: str, path: str
) -> None:
    fuzz(meta_schema, method, path, {"X-Auth-Token": TOKEN})


def served(metrics_text: str) -> int:
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
                   if line.startswith("gasnap_metadata_requests_total{")))


def test_fuzzing_reached_the_service_and_left_it_healthy(meta_server: MetadataServer) -> None:
    assert meta_server.proc is not None and meta_server.proc.poll() is None
    assert "Traceback" not in meta_server.output()
    assert meta_server.get("/v1/health").json()["status"] == "ok"
    # The examples above really ran (about 20 per operation).
    assert served(meta_server.get("/metrics").text) > 5 * len(operations(service_spec.SPEC))


# --- the agent, fuzzed (a real agent on TCP, libvirt behind it) ---------------------

AGENT_TOKEN = "fuzz-t0ken"


@pytest.fixture(scope="module")
def tcp_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with running_agent(tmp_path_factory.mktemp("fuzz-agent"),
                       tcp_token=AGENT_TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def agent_schema(tcp_agent: Agent) -> schemathesis.BaseSchema:
    served = requests.get(f"{tcp_agent.api}/openapi.json", timeout=10).json()
    assert served == agent_spec.SPEC
    return schemathesis.openapi.from_url(f"{tcp_agent.api}/openapi.json")


@pytest.mark.parametrize(("method", "path"), operations(agent_spec.SPEC))
def test_agent_answers_within_its_document(
    agent_schema: schemathesis.BaseSchema, method: str, path: str
) -> None:
    fuzz(agent_schema, method, path, {"Authorization": f"Bearer {AGENT_TOKEN}"})


def test_fuzzing_left_the_agent_healthy(tcp_agent: Agent) -> None:
    assert tcp_agent.proc.poll() is None
    assert "Traceback" not in tcp_agent.output()
    assert tcp_agent.client.get("/v1/health")["status"] == "ok"
    # Everything the fuzzer posted was refused: no task was ever started.
    assert tcp_agent.client.get("/v1/tasks")["tasks"] == []
