"""Typed keys for what the aiohttp application holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from control_plane.reconciler import Reconciler
    from control_plane.registry.store import Store
    from control_plane.settings import Settings

SETTINGS = web.AppKey["Settings"]("settings")
STORE = web.AppKey["Store"]("store")
RECONCILER = web.AppKey["Reconciler"]("reconciler")
ADMIN_KEY = web.AppKey[str]("admin_key")
