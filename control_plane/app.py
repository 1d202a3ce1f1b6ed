"""create_app(settings) -> the controller: admin API (control_plane.api.admin), reconcile loop, health,
metrics.

Effects start in cleanup_ctx: building the application writes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from control_plane import backup, jwt_keys, runtime_tuning
from control_plane.alerts.service import AlertConfig, AlertService, SmtpConfig
from control_plane.alerts.view import BudgetWatch, state_view
from control_plane.api import app_keys
from control_plane.api.admin import AdminDeps, create_admin_app
from control_plane.background import running
from control_plane.client_access_settings import client_access_policy
from control_plane.health.service import HealthService
from control_plane.local_access import Workers, nginx_workers, prepare_socket_dir
from control_plane.metrics import GatewayMetrics
from control_plane.nginx_process import NginxProcess, health_url, worker_count
from control_plane.reconciler import Reconciler, ReconcileTiming
from control_plane.registry.audit import AuditLog
from control_plane.registry.client_keys import ClientKeyStore
from control_plane.registry.scaling import ScalingStore
from control_plane.registry.sealing import registry_sealer
from control_plane.registry.store import Store
from control_plane.registry.usage import UsageStore
from control_plane.render.spec import ServerSettings
from control_plane.routing.service import WeightsService
from control_plane.scaling.command import CommandDriver
from control_plane.scaling.docker import DockerDriver
from control_plane.scaling.drivers import Drivers
from control_plane.scaling.service import ScalingService
from control_plane.settings import MAX_RUN_DIR_LEN, Settings
from control_plane.state_metrics import StateCollector, StubReader
from control_plane.usage.drain import UsageDrain
from control_plane.world import RegistryWorld

log = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def write_secret_file(path: Path, value: str) -> None:
    """Create or replace a 0600 file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.replace(temp, path)


def admin_key(settings: Settings) -> str:
    """ISHGW_ADMIN_API_KEY, or the stored key, or a new one stored 0600."""
    if settings.admin_api_key:
        return settings.admin_api_key
    path = settings.admin_key_file
    with contextlib.suppress(FileNotFoundError):
        stored = path.read_text().strip()
        if stored:
            return stored
    key = "ishgw-admin-" + secrets.token_urlsafe(32)
    write_secret_file(path, key)
    log.info("generated an admin API key in %s", path)
    return key


def tls_files(settings: Settings) -> tuple[str | None, str | None]:
    cert = settings.tls_cert or settings.home / "ssl" / "cert.pem"
    key = settings.tls_key or settings.home / "ssl" / "key.pem"
    if settings.https_port and cert.is_file() and key.is_file():
        return str(cert), str(key)
    return None, None


def server_settings(settings: Settings, workers: Workers | None = None) -> ServerSettings:
    run_dir = settings.sockets_dir
    if len(str(run_dir)) > MAX_RUN_DIR_LEN:
        raise ValueError(f"ISHGW_RUN_DIR {run_dir} is too long for unix sockets (max {MAX_RUN_DIR_LEN})")
    workers = workers or nginx_workers(settings.nginx_user)
    cert, key = tls_files(settings)
    return ServerSettings(
        prefix=str(settings.nginx_dir),
        run_dir=str(run_dir),
        listen_address=settings.listen_address,
        http_port=settings.http_port,
        https_port=settings.https_port if cert else 0,
        tls_cert=cert,
        tls_key=key,
        nginx_user=workers.user,
        nginx_group=workers.group,
        worker_processes=settings.nginx_worker_processes,
        client_max_body_size_mb=settings.client_max_body_size_mb,
        lua_shm_usage_mb=settings.lua_shm_usage_mb,
        usage_accounting=settings.usage_accounting,
        stream_usage=settings.stream_usage == "on",
        lua_shm_state_mb=settings.lua_shm_state_mb,
        expose_instance_headers=settings.expose_instance_headers,
        status_allow=tuple(settings.status_allow),
        upstream_ca_file=str(settings.upstream_ca_file),
        worker_rlimit_nofile=min(65535, resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
        log_server=settings.log_address if settings.log_stream_enabled else None,
        redirect_mode=settings.http_redirect,
        http_redirect=settings.http_redirect == "true",
        domains=tuple(settings.domain),
        acme_webroot=str(acme_webroot(settings)),
        access=client_access_policy(settings, settings.client_max_body_size_mb),
    )


def acme_webroot(settings: Settings) -> Path:
    return settings.acme_webroot or settings.home / "acme"


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    async for _ in app[app_keys.HEALTH].context():
        yield


async def _reconciler_ctx(app: web.Application) -> AsyncIterator[None]:
    reconciler = app[app_keys.RECONCILER]
    await reconciler.reconcile_now()  # adopts what runs when the checksum matches: no reload
    async with running({"reconciler": reconciler.run(), "generation-watch": reconciler.watch_generation()}):
        yield


async def _scaling_ctx(app: web.Application) -> AsyncIterator[None]:
    async for _ in app[app_keys.SCALING].context():
        yield


async def _weights_ctx(app: web.Application) -> AsyncIterator[None]:
    async for _ in app[app_keys.WEIGHTS].context():
        yield


async def _usage_ctx(app: web.Application) -> AsyncIterator[None]:
    async for _ in app[app_keys.USAGE_DRAIN].context():
        yield


async def _alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    async for _ in app[app_keys.ALERTS].context():
        yield


def alert_config(settings: Settings) -> AlertConfig:
    smtp = None
    if settings.alert_smtp_host and settings.alert_email_to:
        password = settings.alert_smtp_password
        smtp = SmtpConfig(
            host=settings.alert_smtp_host,
            port=settings.alert_smtp_port,
            sender=settings.alert_smtp_from,
            to=tuple(settings.alert_email_to),
            user=settings.alert_smtp_user,
            password=password.get_secret_value() if password else None,
            starttls=settings.alert_smtp_starttls,
        )
    return AlertConfig(
        webhooks=tuple(settings.alert_webhook_urls),
        smtp=smtp,
        interval_s=settings.alert_interval_s,
        per_minute=settings.alert_rate_per_min,
        retries=settings.alert_retries,
    )


async def _trim_ctx(_app: web.Application) -> AsyncIterator[None]:
    async with running({"malloc-trim": runtime_tuning.trim_periodically()}):
        yield


async def _backup_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[app_keys.SETTINGS]
    async with running({"backup": backup.run_periodic(settings)} if settings.backup_interval_h else {}):
        yield


def prepare_secret_dirs(settings: Settings) -> None:
    """secrets/ and the default home of provider secret files, secrets/providers/: root's alone (0700)."""
    secrets_dir = settings.home / "secrets"
    paths = [secrets_dir, secrets_dir / "providers"] if settings.secret_dirs is None else [secrets_dir]
    for path in paths:
        path.mkdir(exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)


def stub_status_url(server: ServerSettings) -> str:
    wildcard = server.listen_address in ("0.0.0.0", "*", "::", "[::]")
    host = "127.0.0.1" if wildcard else server.listen_address
    return f"http://{host}:{server.http_port}/nginx_status"


def metrics_handler(registry: CollectorRegistry, stub: StubReader) -> Handler:
    """/metrics: nginx's stub_status is read first, so its series are as fresh as the scrape."""
    inner = make_aiohttp_handler(registry)

    async def handler(request: web.Request) -> web.StreamResponse:
        await stub.refresh()
        return await inner(request)

    return handler


def prepare_home(settings: Settings, workers: Workers) -> None:
    """The directories under home, each with its mode. Traversable but not listable: nginx workers (an
    unprivileged user) pass through home to run/, which only they and the controller may traverse
    (local_access); everything secret below home (secrets/, the database, generations/) is 0600/0700 on its
    own."""
    settings.home.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.home, 0o711)
    prepare_socket_dir(settings.sockets_dir, workers.gid)
    prepare_secret_dirs(settings)
    (acme_webroot(settings) / ".well-known" / "acme-challenge").mkdir(parents=True, exist_ok=True)


def _startup_ctx(workers: Workers, nginx: NginxProcess) -> CleanupContext:
    """First of the application's contexts: the files and the database the others rely on. Refuses to start
    (RegistryKeyError) without the key the provider keys were sealed with."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        settings, store = app[app_keys.SETTINGS], app[app_keys.STORE]
        prepare_home(settings, workers)
        store.migrate()
        # Provider keys sealed at rest (RegistryKeyError: no start without the key they were sealed with).
        store.attach_sealer(registry_sealer(settings.registry_key_path, store.registry_key_id()))
        nginx.prepare()
        app[app_keys.ADMIN_KEY] = admin_key(settings)
        yield

    return context


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    """The controller's application. Building it starts nothing and writes nothing (but the SQLite file the
    store opens); the effects run in its cleanup contexts, in order, when it starts."""
    workers = nginx_workers(settings.nginx_user)
    server = server_settings(settings, workers)
    if not settings.auth_required:
        log.warning("ISHGW_AUTH_REQUIRED=false: the data plane serves clients without an API key")
    jwt_keys.load(server.access.jwt_files)  # refuse to start with unusable JWT key files (JwtConfigError)
    store = Store(settings.database_url)
    metrics = GatewayMetrics(registry or CollectorRegistry(), settings.metrics_key_label)
    nginx = NginxProcess(
        settings.nginx_dir,
        settings.nginx_binary,
        settings.generations_kept,
        run_dir=settings.sockets_dir,
        health=health_url(server.listen_address, server.http_port),
        workers=worker_count(server.worker_processes),
    )
    timing = ReconcileTiming(
        debounce_s=settings.reconcile_debounce_s,
        max_wait_s=settings.reconcile_max_wait_s,
        min_reload_interval_s=settings.reload_min_interval_s,
        resync_interval_s=settings.resync_interval_s,
        generation_poll_s=settings.generation_poll_s,
    )
    world = RegistryWorld(store, server.tls_cert, server.access.jwt_files, settings.secret_policy())
    reconciler = Reconciler(world, nginx, server, metrics, timing)
    health = HealthService(
        store,
        reconciler,
        settings.log_address,
        settings.probes_enabled,
        metrics,
        log_group=workers.gid,
        max_retry_after_s=settings.max_retry_after_s,
        nginx_workers=nginx.workers,
    )
    weights = WeightsService(reconciler, metrics)
    health.log_observers.append(weights.on_logs)
    usage_drain = UsageDrain(
        server.usage_socket,
        UsageStore(store),
        metrics,
        settings.usage_drain_interval_s,
        settings.usage_minute_retention_h,
        settings.usage_day_retention_d,
    )
    scaling = ScalingService(
        ScalingStore(store),
        store,
        reconciler,
        nginx,
        Drivers(
            CommandDriver(settings.home / "scaling", frozenset(settings.scaling_commands)),
            DockerDriver(settings.docker_host, settings.home, frozenset(settings.scaling_images)),
        ),
        health.probe_config,
        lambda: health.tracker.addresses,
        metrics.registry,
    )
    health.log_observers.append(scaling.on_logs)
    usage_drain.observers.append(health.on_usage)  # instances' max_tpm
    tracker, warn_days = health.tracker, settings.alert_certificate_days
    budgets = BudgetWatch(ClientKeyStore(store), UsageStore(store))
    alerts = AlertService(
        alert_config(settings),
        lambda: state_view(tracker, reconciler, server.tls_cert, warn_days, time.time(), budgets.current),
        metrics.registry,
    )
    stub = StubReader(stub_status_url(server))
    metrics.registry.register(StateCollector(health.tracker, server.tls_cert, stub))
    app = create_admin_app(
        AdminDeps(
            settings=settings,
            store=store,
            reconciler=reconciler,
            admin_key=None,  # read or created by _startup_ctx
            health=health,
            weights=weights,
            usage_drain=usage_drain,
            scaling=scaling,
            alerts=alerts,
            audit=AuditLog(store, settings.audit_keep),
        )
    )
    app.router.add_get("/metrics", metrics_handler(metrics.registry, stub))
    app.cleanup_ctx.append(_startup_ctx(workers, nginx))  # first: files and migrations the rest rely on
    app.cleanup_ctx.append(_health_ctx)  # the log socket exists before nginx is told to write to it
    app.cleanup_ctx.append(_reconciler_ctx)
    app.cleanup_ctx.append(_scaling_ctx)  # after the reconciler: it applies through it
    app.cleanup_ctx.append(_usage_ctx)  # stopped first: its last drain runs while the store is open
    app.cleanup_ctx.append(lambda _app: budgets.context())
    app.cleanup_ctx.append(_alerts_ctx)
    app.cleanup_ctx.append(_backup_ctx)
    app.cleanup_ctx.append(_weights_ctx)
    app.cleanup_ctx.append(_trim_ctx)  # free heap pages back to the kernel (runtime_tuning.py)
    app.on_cleanup.append(lambda _app: asyncio.to_thread(store.close))
    return app
