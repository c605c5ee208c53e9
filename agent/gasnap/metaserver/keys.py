"""Typed application keys of the metadata service."""

from __future__ import annotations

from aiohttp import web

from ..metastore import SqlMetadata
from .keystone import KEYSTONE_PASSWORD, KEYSTONE_TOKENS

DB_URL = web.AppKey("db_url", str)
STORE = web.AppKey("store", SqlMetadata)
__all__ = ["DB_URL", "KEYSTONE_PASSWORD", "KEYSTONE_TOKENS", "STORE"]
