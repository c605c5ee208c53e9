"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

from aiohttp import web

from ..cinder import CinderReporter
from ..cloneservice import CloneService
from ..config import Settings
from ..hypervisor import Hypervisor
from ..service import SnapshotService

SETTINGS = web.AppKey("settings", Settings)
HYPERVISOR = web.AppKey("hypervisor", Hypervisor)
SERVICE = web.AppKey("service", SnapshotService)
CLONES = web.AppKey("clones", CloneService)
CINDER: web.AppKey[CinderReporter | None] = web.AppKey("cinder")  # None: no [cinder]
