"""The reliability stage: clients (wrk and the openai SDK, retrying and not) under a reload storm, and
while one of three instances is killed."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from scripts.bench import load
from scripts.bench.common import log
from scripts.bench.procs import Procs
from scripts.bench.systems import Backend

if TYPE_CHECKING:
    from scripts.bench.main import Bench


def _clients_during(
    bench: Bench, seconds: float, model_script: Path, base: str, model: str = load.MODEL
) -> dict[str, Any]:
    """wrk (c16) and two openai SDK pools (retrying and not) at once for `seconds`."""
    out: dict[str, Any] = {}
    threads = []

    def run_wrk() -> None:
        out["wrk"] = load.run_wrk(base + "/v1/chat/completions", model_script, 16, 1, seconds).to_dict()

    def run_sdk(key: str, retries: int) -> None:
        out[key] = load.run_openai_sdk(base + "/v1", bench.gateway_key, 4, seconds, retries, model).to_dict()

    threads.append(threading.Thread(target=run_wrk))
    threads.append(threading.Thread(target=run_sdk, args=("sdk_raw", 0)))
    threads.append(threading.Thread(target=run_sdk, args=("sdk_retrying", 2)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 90)
    return out


def reload_storm(bench: Bench) -> None:
    assert bench.gateway
    gw = bench.gateway
    seconds = bench.p.storm_s
    log(f"--- reloads every 0.5 s for {seconds:g} s under load (wrk c16 + openai SDK 2x4 threads)")
    stop = threading.Event()
    admin = httpx.Client(
        base_url=f"http://127.0.0.1:{gw.gw.admin_port}",
        headers={"X-Admin-API-Key": gw.gw.admin_key},
        timeout=30,
    )
    reloads: list[Any] = []

    def reload_once() -> bool:
        response = admin.post("/admin/reload")
        return response.status_code == 200 and bool(response.json().get("ok"))

    def storm() -> None:
        time.sleep(0.5)
        reloads.extend(load.repeat_every(0.5, reload_once, stop, limit=int(seconds * 2) + 4))

    thread = threading.Thread(target=storm)
    thread.start()
    try:
        out = _clients_during(bench, seconds, bench.scripts["gateway"], gw.http_url)
    finally:
        stop.set()
        thread.join(60)
        admin.close()
    out["reloads"] = sum(1 for r in reloads if r is True)
    out["reload_errors"] = sum(1 for r in reloads if r is not True)
    gw.adopt_nginx()
    bench.results["reliability"]["reload_storm"] = out
    log(
        f"reload storm: {out['reloads']} reloads; failed: "
        f"wrk {out['wrk']['failed']}/{out['wrk']['requests']}, "
        f"SDK raw {out['sdk_raw']['failed']}/{out['sdk_raw']['requests']}, SDK retrying "
        f"{out['sdk_retrying']['failed']}/{out['sdk_retrying']['requests']}"
    )


def kill_one(bench: Bench) -> None:
    assert bench.gateway
    gw = bench.gateway
    seconds = bench.p.kill_s
    log(f"--- one of three instances killed under load ({seconds:g} s)")
    stubs = [Backend(bench.procs, bench.work, 1, 50, 0, name=f"kill{i}") for i in range(3)]
    try:
        for i, stub in enumerate(stubs):
            response = gw.gw.add_instance(
                name=f"kill-{i}",
                provider_type="openai_compatible",
                api_base=f"{stub.url}/v1",
                supported_models=["kill-model"],
                retry_count=2,
            )
            if response.status_code != 201:
                raise RuntimeError(f"kill-{i}: {response.status_code} {response.text}")
        gw.gw.wait_applied(timeout=20)
        gw.adopt_nginx()
        script = load.write_wrk_script(
            bench.work / "kill.lua", load.chat_body(model="kill-model"), bench.gateway_key
        )
        killer = threading.Timer(seconds / 3, stubs[1].kill)
        killer.start()
        try:
            out = _clients_during(bench, seconds, script, gw.http_url, "kill-model")
        finally:
            killer.cancel()
        out["killed_after_s"] = round(seconds / 3, 1)
        bench.results["reliability"]["kill_one"] = out
        log(
            f"kill one: failed wrk {out['wrk']['failed']}/{out['wrk']['requests']}, SDK raw "
            f"{out['sdk_raw']['failed']}, SDK retrying {out['sdk_retrying']['failed']}"
        )
    except Exception as exc:
        bench.results["reliability"]["kill_one"] = {"error": f"{type(exc).__name__}: {exc}"}
        bench.note(f"kill-one scenario failed: {exc}")
    finally:
        for i in range(3):
            gw.gw.admin.delete(f"/admin/instances/kill-{i}")
        for stub in stubs:
            Procs.stop_group(stub.proc)
