"""Typed application keys of the metadata service."""

from __future__ import annotations

from aiohttp import web

from ..metastore import SqlMetadata

DB_URL = web.AppKey("db_url", str)
STORE = web.AppKey("store", SqlMetadata)
# The stand-in Keystone's one password: the service's token ("" without one).
KEYSTONE_PASSWORD = web.AppKey("keystone_password", str)
