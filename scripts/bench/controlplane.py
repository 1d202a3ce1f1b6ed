"""The control-plane stage of a run, on a gateway of its own: API change -> live, reconcile time per
registry size with its split, probing cost. The measurements themselves are in control.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scripts.bench import control, features
from scripts.bench.common import DUMMY_KEY, LARGE, log
from scripts.bench.systems import GatewaySystem

if TYPE_CHECKING:
    from scripts.bench.main import Bench


def control_plane(bench: Bench) -> None:
    """On a gateway of its own in production shape (HTTPS on, plain HTTP redirecting, every feature
    setting as above): API changes go live over HTTPS, and the rendered tree is the one production has."""
    assert bench.gateway and bench.backend
    bench.gateway.stop()  # the data-plane gateway is done: its probes and reloads would only add noise
    env = {k: v for k, v in bench.gateway_env.items() if k != "ISHGW_HTTP_REDIRECT"}
    gw = GatewaySystem(bench.procs, env)
    bench.gateway = gw
    try:
        _control_plane(bench, gw, env)
    finally:
        gw.adopt_nginx()


def _control_plane(bench: Bench, gw: GatewaySystem, env: dict[str, str]) -> None:
    assert bench.backend
    key, _ = features.create_client_key(gw.gw.admin)
    log(f"control-plane gateway: https :{gw.https_port} (HTTP redirects), admin :{gw.gw.admin_port}")
    log(f"--- admin API change -> live, {bench.p.live_changes} changes")
    live = control.api_change_to_live(
        gw,
        bench.backend.url,
        bench.p.live_changes,
        key or DUMMY_KEY,
        tls=True,
        max_seconds=max(15.0, bench.budget.left() - 30),
    )
    bench.results["control_plane"]["api_to_live"] = live.to_dict()
    summary = live.to_dict()
    log(
        f"API change -> live: p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
        f"timeouts {live.timeouts}"
    )
    sizes = list(bench.p.sizes)
    if bench.budget.left() < 25:
        sizes = [s for s in sizes if s[0] < 1000]
        bench.note("1,000-instance case skipped: time budget")
    if LARGE in sizes and bench.budget.left() < 240:
        sizes.remove(LARGE)
        bench.note("10,000-instance case skipped: time budget")
    log(f"--- reconcile time at {sizes}")
    from control_plane.app import server_settings
    from control_plane.settings import Settings

    # the controller's own settings (same environment), so the in-process render is the same tree
    pinned = {k.removeprefix("ISHGW_").lower(): v for k, v in env.items()}
    pinned.update(home=str(gw.gw.home), http_port=str(gw.gw.http_port), https_port=str(gw.https_port))
    server = server_settings(Settings.model_validate(pinned))
    # Reconcile as issue 17 measures it: a default deploy with probes off. With probes on, each import's
    # new instances are probed at once (1,000/s at 10,000) on the same 2 cores as the passes measured.
    gw.restart_controller(ISHGW_PROBES_ENABLED="false")
    scaling = control.reconcile_scaling(gw, bench.backend.url, sizes, bench.p.scale_reps, server)
    gw.restart_controller(ISHGW_PROBES_ENABLED="true")
    bench.results["control_plane"]["scaling"] = [s.to_dict() for s in scaling]
    largest = max((s.instances for s in scaling if not s.error), default=0)
    if largest and bench.budget.left() > 2 * bench.p.probe_window_s + 10:
        log(f"--- probing {largest} idle instances: settle, then measure {bench.p.probe_window_s:.0f} s")
        cost = control.probe_cost(gw, largest, bench.p.probe_window_s)
        bench.results["control_plane"]["probing"] = cost.to_dict()
        log(f"probing: {cost.probes} probes, controller {cost.controller_cores} cores")
    for s in scaling:
        log(
            f"{s.instances} instances / {s.pools} pools: reconcile {s.reconcile_ms} ms, "
            f"render {s.render_ms} ms, "
            f"nginx -t {s.nginx_t_ms} ms, {s.rendered_kb} KB, controller RSS {s.controller_rss_mb} MB"
            + (f", error {s.error}" if s.error else "")
        )
