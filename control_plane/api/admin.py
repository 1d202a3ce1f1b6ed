"""create_admin_app(deps) -> the admin listener's aiohttp application: the middlewares (``MIDDLEWARES``), the
route table (``routes.ROUTES``), the status page, and what they work with (``AdminDeps``) under the typed
keys of ``app_keys``. Production (control_plane.app) and the tests build it through this one factory; it
starts nothing and touches no file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from control_plane.alerts.service import AlertService
from control_plane.api import app_keys, status_page
from control_plane.api.audit import AUDIT
from control_plane.api.auth import AUTH_THROTTLE, AuthThrottle
from control_plane.api.middleware import MIDDLEWARES
from control_plane.api.routes import setup_routes
from control_plane.health.service import HealthService
from control_plane.reconciler import Reconciler
from control_plane.registry.audit import AuditLog
from control_plane.registry.store import Store
from control_plane.routing.service import WeightsService
from control_plane.scaling.service import ScalingService
from control_plane.settings import Settings
from control_plane.usage.drain import UsageDrain

T = TypeVar("T")


@dataclass(frozen=True)
class AdminDeps:
    """What the admin API works with. A service left out (None) is one a test does without; production
    gives them all. ``admin_key`` None: the key is set when the application starts (control_plane.app reads
    or creates its file then). ``throttle`` None: one from the settings."""

    settings: Settings
    store: Store
    reconciler: Reconciler
    admin_key: str | None
    health: HealthService | None = None
    weights: WeightsService | None = None
    usage_drain: UsageDrain | None = None
    scaling: ScalingService | None = None
    alerts: AlertService | None = None
    audit: AuditLog | None = None
    throttle: AuthThrottle | None = None


def _throttle(settings: Settings) -> AuthThrottle:
    limit, window_s = settings.admin_auth_failure_limit, settings.admin_auth_failure_window_s
    return AuthThrottle(limit=limit, window_s=window_s)


def _put(app: web.Application, key: web.AppKey[T], value: T | None) -> None:
    if value is not None:
        app[key] = value


def create_admin_app(deps: AdminDeps) -> web.Application:
    app = web.Application(middlewares=MIDDLEWARES)
    app[app_keys.SETTINGS] = deps.settings
    app[app_keys.STORE] = deps.store
    app[app_keys.RECONCILER] = deps.reconciler
    _put(app, app_keys.ADMIN_KEY, deps.admin_key)
    app[AUTH_THROTTLE] = deps.throttle if deps.throttle is not None else _throttle(deps.settings)
    _put(app, app_keys.HEALTH, deps.health)
    _put(app, app_keys.WEIGHTS, deps.weights)
    _put(app, app_keys.USAGE_DRAIN, deps.usage_drain)
    _put(app, app_keys.SCALING, deps.scaling)
    _put(app, app_keys.ALERTS, deps.alerts)
    _put(app, AUDIT, deps.audit)
    setup_routes(app)
    status_page.setup_status_page(app, deps.settings.admin_session_ttl_s)
    if deps.alerts is not None:
        app[status_page.RECENT_ALERTS] = deps.alerts.recent
    return app
