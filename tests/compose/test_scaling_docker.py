"""Autoscaling with the docker driver for real: the controller starts members as containers through podman's
Docker API (tests/compose/conftest.py's engine) with the `docker` SDK, finds them again by their labels
after a restart (also one killed while a container was starting), stops and removes them, and runs the
issue's load ramp (tests/integration/scaling_load.py, as the command driver's test does). The member image
runs the stand-in backend: the local debian base, python3 from its mirror, and the stand-in with this
venv's aiohttp copied in (cp311 both), so no registry is needed; its layers are cached by the engine from
one run to the next."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.compose.conftest import ROOT, Engine
from tests.integration.gateway import Gateway, wait_for
from tests.integration.scaling_load import (
    MODEL,
    RAMP_MAX,
    RAMP_MAX_CONCURRENT,
    RAMP_TRIGGERS,
    events,
    members,
    ramp,
    serving,
)
from tests.ports import port_range

pytestmark = pytest.mark.compose

IMAGE = "localhost/ishgw-stub:test"
MISSING = "localhost/ishgw-missing:none"
LABEL = "io.ishgw.group"
# aiohttp and what it imports, from this venv (Debian's python3-aiohttp is older than the stand-in needs).
SITE = (
    "aiohttp",
    "multidict",
    "yarl",
    "frozenlist",
    "aiosignal",
    "attr",
    "attrs",
    "propcache",
    "aiohappyeyeballs",
    "idna",
    "typing_extensions.py",
)
CONTAINERFILE = """FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \\
 && rm -rf /var/lib/apt/lists/*
COPY site /app/site
COPY tests /app/tests
ENV PYTHONPATH=/app/site:/app
ENTRYPOINT ["python3", "/app/tests/backends/stub_llm.py", "--host", "0.0.0.0"]
"""


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    if sys.version_info[:2] != (3, 11):
        pytest.fail("the member image copies this venv's cp311 aiohttp: run the suite on Python 3.11")
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and (Path(p) / "aiohttp").is_dir()))
    context = Path(tempfile.mkdtemp(prefix="ishgw-stub-image-"))
    try:
        (context / "Containerfile").write_text(CONTAINERFILE)
        # The stand-in and the one module of the suite it imports (its ports), as the package they are in.
        for part in ("__init__.py", "ports.py", "backends/__init__.py", "backends/stub_llm.py"):
            (context / "tests" / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "tests" / part, context / "tests" / part)
        for name in SITE:
            source = site / name
            target = context / "site" / name
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
        containerfile = str(context / "Containerfile")
        built = engine.podman("build", "-q", "-f", containerfile, "-t", IMAGE, str(context), timeout=900)
        assert built.returncode == 0, built.stderr[-2000:]
    finally:
        shutil.rmtree(context, ignore_errors=True)
    return IMAGE


@pytest.fixture(scope="module")
def gw(engine: Engine, image: str) -> Iterator[Gateway]:
    env = {"ISHGW_SCALING_IMAGES": f"{image},{MISSING}", "ISHGW_DOCKER_HOST": f"unix://{engine.socket}"}
    with Gateway(env) as gateway:
        try:
            yield gateway
        finally:
            gone = engine.podman("ps", "-aq", "--filter", "label=io.ishgw.gateway", timeout=30).stdout.split()
            ours = [c for c in gone if c]
            if ours:  # a test that failed before deleting its group must not leave containers behind
                engine.podman("rm", "-f", "-t", "1", *ours, timeout=60)


@pytest.fixture(autouse=True)
def no_group_left(gw: Gateway, engine: Engine) -> Iterator[None]:
    """A test that failed before deleting its group must not fail the tests after it too."""
    yield
    for view in gw.admin.get("/admin/scaling/groups").json()["groups"]:
        gw.admin.delete(f"/admin/scaling/groups/{view['group']['name']}")
    wait_for(lambda: not containers(engine), timeout=90, what="members stopped")


def containers(engine: Engine, group: str | None = None) -> list[dict[str, Any]]:
    label = f"label={LABEL}={group}" if group else "label=io.ishgw.gateway"
    listed = engine.podman("ps", "-a", "--filter", label, "--format", "json", timeout=30)
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout or "[]"))


def group_doc(name: str, ports: range, image: str, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "models": [MODEL],
        "driver": "docker",
        "docker": {
            "image": image,
            "command": ["--port", "8000", "--name", "{name}", "--models", MODEL],
            "container_port": 8000,
        },
        "template": {"provider_type": "ollama", "health": {"probe_interval_s": 1}},
        "min_instances": 1,
        "max_instances": 2,
        "evaluation_interval_s": 0.5,
        "ready_timeout_s": 30,
        "triggers": {},
        "port_min": ports[0],
        "port_max": ports[-1],
    }
    doc.update(changes)
    return doc


def test_docker_members_start_serve_survive_a_restart_and_go(gw: Gateway, engine: Engine, image: str) -> None:
    ports = port_range(21)
    refused = group_doc("dock", ports, "localhost/not-allowed:1")
    r = gw.admin.post("/admin/scaling/groups", json=refused)
    assert r.status_code == 422 and "docker.image" in r.text, r.text

    assert gw.admin.post("/admin/scaling/groups", json=group_doc("dock", ports, image)).status_code == 201
    wait_for(lambda: serving(gw, "dock") == ["dock-1"], timeout=60, what="the first container member")
    wait_for(lambda: events(gw, "dock"), timeout=10, what="the scale-out event")
    (started,) = [e for e in events(gw, "dock") if e["direction"] == "out"]
    assert started["outcome"] == "ok" and started["instance"] == "dock-1", started
    (container,) = containers(engine, "dock")
    labels = container["Labels"]
    assert labels["io.ishgw.member"] == "dock-1" and labels["io.ishgw.port"] == str(started["port"])
    assert container["State"] == "running"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=20)
    assert answer.status_code == 200 and answer.headers["X-ISHGW-Instance"] == "dock-1", answer.text

    # A controller killed and started again finds its container by the labels: the same one, not a second.
    gw.kill_controller()
    gw.start_controller()
    log = f"docker logs {container['Id'][:12]}"
    wait_for(
        lambda: [m["log"] for m in members(gw, "dock") if m["registered"]] == [log],
        timeout=60,
        what="the container adopted after the restart",
    )
    assert [c["Id"] for c in containers(engine, "dock")] == [container["Id"]]
    assert len([e for e in events(gw, "dock") if e["direction"] == "out"]) == 1

    # Deleting the group drains, stops (SIGTERM, then SIGKILL) and removes the container.
    assert gw.admin.delete("/admin/scaling/groups/dock").status_code == 204
    wait_for(lambda: not containers(engine, "dock"), timeout=90, what="the container removed")
    gone = wait_for(lambda: gw.admin.get("/admin/instances/dock-1").status_code == 404, timeout=30)
    assert gone
    print(f"docker driver: decision to first served request {started['duration_s']} s")


def test_a_missing_image_is_a_failed_launch_never_registered(gw: Gateway, engine: Engine) -> None:
    ports = port_range(21)
    assert gw.admin.post("/admin/scaling/groups", json=group_doc("nope", ports, MISSING)).status_code == 201
    wait_for(lambda: events(gw, "nope"), timeout=60, what="the failed launch")
    (failed,) = events(gw, "nope")[-1:]
    assert failed["outcome"] == "failed" and "retry_in_s" in failed, failed
    assert MISSING.split(":")[0].split("/")[-1] in failed["error"] or "image" in failed["error"], failed
    assert gw.admin.get("/admin/instances/nope-1").status_code == 404
    assert not containers(engine, "nope")
    assert gw.admin.delete("/admin/scaling/groups/nope").status_code == 204


def test_docker_ramp_scales_out_under_load_then_in_with_no_failed_request(gw: Gateway, image: str) -> None:
    stub = ["--port", "8000", "--name", "{name}", "--models", MODEL, "--chunks", "5"]
    stub += ["--chunk-delay-ms", "60"]
    doc = group_doc(
        "dramp",
        port_range(21),
        image,
        docker={"image": image, "command": stub, "container_port": 8000},
        template={
            "provider_type": "ollama",
            "max_concurrent_requests": RAMP_MAX_CONCURRENT,
            "health": {"probe_interval_s": 1},
        },
        max_instances=RAMP_MAX,
        sustain_s=1,
        window_s=2,
        cooldown_out_s=1,
        cooldown_in_s=3,
        drain_timeout_s=30,
        triggers=RAMP_TRIGGERS,
    )
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
    figures = ramp(gw, doc)
    print(f"docker driver ramp: {figures}")


def test_a_controller_killed_while_a_container_starts_adopts_it(
    gw: Gateway, engine: Engine, image: str
) -> None:
    # Each member waits 3 s before listening: the second one's container runs, not yet healthy, when the
    # controller is killed (SIGKILL) in the middle of that scale-out.
    slow = ["--port", "8000", "--name", "{name}", "--models", MODEL, "--start-delay-ms", "3000"]
    doc = group_doc(
        "held",
        port_range(21),
        image,
        docker={"image": image, "command": slow, "container_port": 8000},
        min_instances=2,
        max_instances=2,
    )
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201

    def starting() -> bool:
        found = containers(engine, "held")
        running = {c["Labels"]["io.ishgw.member"] for c in found if c["State"] == "running"}
        return running == {"held-1", "held-2"} and serving(gw, "held") == ["held-1"]

    wait_for(starting, timeout=60, interval=0.05, what="the second container started, not yet serving")
    gw.kill_controller()
    before = {c["Labels"]["io.ishgw.member"]: c["Id"] for c in containers(engine, "held")}
    assert set(before) == {"held-1", "held-2"}, before
    gw.start_controller()
    wait_for(lambda: serving(gw, "held") == ["held-1", "held-2"], timeout=60, what="both serving again")

    # Converged to the same count: the container started before the kill, adopted, and no other one, also
    # after further evaluations.
    def adoptions() -> list[dict[str, Any]]:
        return [e for e in events(gw, "held") if e["direction"] == "adopt"]

    adopted = wait_for(adoptions, timeout=20, what="the adoption's event")  # written once nginx serves it
    assert [(e["instance"], e["outcome"]) for e in adopted] == [("held-2", "ok")], adopted
    # The first evaluation after the restart comes once nothing is left to adopt: it holds at 2.
    status = wait_for(
        lambda: (view := gw.admin.get("/admin/scaling/groups/held").json())["last_decision"] and view,
        timeout=10,
        what="an evaluation after the adoption",
    )
    assert (status["last_decision"]["direction"], status["last_decision"]["current"]) == ("hold", 2), status
    after = {c["Labels"]["io.ishgw.member"]: c["Id"] for c in containers(engine, "held")}
    assert after == before, (before, after)
    # The second scale-out never finished (no event); the member it started is the one adopted.
    assert [e["instance"] for e in events(gw, "held") if e["direction"] == "out"] == ["held-1"]
    assert gw.admin.delete("/admin/scaling/groups/held").status_code == 204
    wait_for(lambda: not containers(engine, "held"), timeout=90, what="the containers removed")
