"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

from aiohttp import web

from ..config import Settings
from ..service import SnapshotService
from ..virt import LibvirtHypervisor

SETTINGS = web.AppKey("settings", Settings)
HYPERVISOR = web.AppKey("hypervisor", LibvirtHypervisor)
SERVICE = web.AppKey("service", SnapshotService)
