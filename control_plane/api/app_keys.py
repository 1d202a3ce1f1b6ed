"""Typed keys for what the aiohttp application (``AppKey``) and a request (``RequestKey``) hold."""

from __future__ import annotations

from aiohttp import web

from control_plane.alerts.service import AlertService
from control_plane.health.service import HealthService
from control_plane.reconciler import Reconciler
from control_plane.registry.store import Store
from control_plane.routing.service import WeightsService
from control_plane.scaling.service import ScalingService
from control_plane.settings import Settings
from control_plane.usage.drain import UsageDrain

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
RECONCILER = web.AppKey("reconciler", Reconciler)
ADMIN_KEY = web.AppKey("admin_key", str)
HEALTH = web.AppKey("health", HealthService)
USAGE_DRAIN = web.AppKey("usage_drain", UsageDrain)
SCALING = web.AppKey("scaling", ScalingService)
ALERTS = web.AppKey("alerts", AlertService)
WEIGHTS = web.AppKey("weights", WeightsService)
# What the audit log names as a change's target, when the path alone does not say it (a client key's name).
AUDIT_TARGET = web.RequestKey("audit_target", str)
