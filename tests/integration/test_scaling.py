"""Autoscaling with the command driver against real nginx: members are stand-in backends started as
processes by the controller. Intervals are short here (settable per group); every wait is on a condition."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from control_plane.scaling.command import Member, alive
from tests.integration.gateway import ROOT, Gateway, wait_for
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

PY = sys.executable
NO_DOCKER = "/nonexistent/ishgw-no-docker.sock"


def stub_argv(*extra: str) -> list[str]:
    return [
        PY,
        "-m",
        "tests.backends.stub_llm",
        "--port",
        "{port}",
        "--name",
        "{name}",
        "--models",
        MODEL,
        *extra,
    ]


def group_doc(name: str, ports: range, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "models": [MODEL],
        # Each answer takes 5 chunks x 60 ms: a few clients keep a member busy.
        "command": {"argv": stub_argv("--chunks", "5", "--chunk-delay-ms", "60"), "cwd": str(ROOT)},
        "template": {
            "provider_type": "ollama",
            "max_concurrent_requests": RAMP_MAX_CONCURRENT,
            "health": {"probe_interval_s": 1},
        },
        "min_instances": 1,
        "max_instances": RAMP_MAX,
        "evaluation_interval_s": 0.5,
        "sustain_s": 1,
        "window_s": 2,
        "cooldown_out_s": 1,
        "cooldown_in_s": 3,
        "ready_timeout_s": 20,
        "drain_timeout_s": 30,
        "triggers": RAMP_TRIGGERS,
        "port_min": ports[0],
        "port_max": ports[-1],
    }
    doc.update(changes)
    return doc


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    # No Docker engine on the socket the docker driver is given (as on a machine without Docker).
    env = {"ISHGW_SCALING_COMMANDS": f"{PY},/bin/false", "ISHGW_DOCKER_HOST": f"unix://{NO_DOCKER}"}
    with Gateway(env) as gateway:
        try:
            yield gateway
        finally:
            stop_members(gateway)


@pytest.fixture(autouse=True)
def no_group_left(gw: Gateway) -> Iterator[None]:
    """A test that failed before deleting its group must not fail the tests after it too."""
    yield
    for view in gw.admin.get("/admin/scaling/groups").json()["groups"]:
        gw.admin.delete(f"/admin/scaling/groups/{view['group']['name']}")
    wait_for(lambda: not list((gw.home / "scaling").glob("*/*.json")), timeout=60, what="members stopped")


def stop_members(gw: Gateway) -> None:
    """Members outlive the controller by design (a restarted one adopts them): a test that failed before
    deleting its group must not leave them running."""
    for state in (gw.home / "scaling").glob("*/*.json"):
        member = Member(**json.loads(state.read_text()))
        if alive(member):
            os.killpg(member.pid, signal.SIGKILL)


def test_bad_groups_are_422_and_change_nothing(gw: Gateway) -> None:
    ports = port_range(21)
    for doc, field in (
        (group_doc("bad", ports, command={"argv": ["/bin/sh", "-c", "true"]}), "command.argv.0"),
        (group_doc("bad", ports, min_instances=5), "min_instances"),
        (
            group_doc(
                "bad", ports, triggers={"utilisation": {"scale_out_above": 0.1, "scale_in_below": 0.5}}
            ),
            "band",
        ),
    ):
        r = gw.admin.post("/admin/scaling/groups", json=doc)
        assert r.status_code == 422, r.text
        assert field in json.dumps(r.json()), r.text
    assert gw.admin.get("/admin/scaling/groups").json() == {"groups": []}
    assert gw.admin.get("/admin/scaling/groups/bad").status_code == 404


def test_scale_out_under_load_then_in_after_cooldown_with_no_failed_request(gw: Gateway) -> None:
    doc = group_doc("ramp", port_range(21))
    r = gw.admin.post("/admin/scaling/groups", json=doc)
    assert r.status_code == 201, r.text
    figures = ramp(gw, doc)
    print(f"command driver ramp: {figures}")


def test_a_failing_launch_is_an_event_retried_with_backoff_and_never_registered(gw: Gateway) -> None:
    ports = port_range(21)
    doc = group_doc("broken", ports, command={"argv": ["/bin/false"]}, ready_timeout_s=5)
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
    wait_for(lambda: len(events(gw, "broken")) >= 2, timeout=30, what="two failed launches")
    failed = events(gw, "broken")
    assert all(e["outcome"] == "failed" and "exited" in e["error"] for e in failed), failed
    assert failed[0]["retry_in_s"] > failed[1]["retry_in_s"]  # newest first: the wait doubles
    assert gw.admin.get("/admin/instances/broken-1").status_code == 404
    assert members(gw, "broken") == []
    assert gw.admin.delete("/admin/scaling/groups/broken").status_code == 204


def test_a_taken_port_is_a_failed_launch_then_the_member_starts_once_it_is_free(gw: Gateway) -> None:
    ports = port_range(1)
    doc = group_doc("taken", ports, max_instances=1, triggers={})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[0]))
        holder.listen()
        assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
        wait_for(lambda: events(gw, "taken"), timeout=30, what="a failed launch")
        (failed,) = events(gw, "taken")
        assert failed["outcome"] == "failed" and f"no free port in {ports[0]}-{ports[0]}" in failed["error"]
        assert failed["retry_in_s"] > 0
        assert gw.admin.get("/admin/instances/taken-1").status_code == 404 and members(gw, "taken") == []
    # Free again: the retry after the backoff starts the member, and it serves.
    wait_for(lambda: serving(gw, "taken") == ["taken-1"], timeout=30, what="the member once the port is free")
    assert members(gw, "taken")[0]["port"] == ports[0]
    assert gw.admin.delete("/admin/scaling/groups/taken").status_code == 204


def test_a_restarted_controller_adopts_its_members(gw: Gateway) -> None:
    ports = port_range(21)
    doc = group_doc("kept", ports, min_instances=2, max_instances=2, triggers={})
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
    wait_for(lambda: len(serving(gw, "kept")) == 2, timeout=40, what="two members")
    pids = {m["name"]: m["pid"] for m in members(gw, "kept")}
    gw.kill_controller()
    gw.start_controller()
    wait_for(lambda: len(serving(gw, "kept")) == 2, timeout=30, what="members after restart")
    assert {m["name"]: m["pid"] for m in members(gw, "kept")} == pids  # the same processes
    assert not [e for e in events(gw, "kept") if e["direction"] == "out" and e["outcome"] == "ok"][2:]
    # A member whose process dies is forgotten and replaced (min_instances).
    os.kill(pids["kept-2"], signal.SIGKILL)
    wait_for(
        lambda: any(e["direction"] == "lost" for e in events(gw, "kept")), timeout=30, what="the lost member"
    )
    wait_for(lambda: len(serving(gw, "kept")) == 2, timeout=40, what="replaced")
    assert gw.admin.delete("/admin/scaling/groups/kept").status_code == 204
    state = gw.home / "scaling" / "kept"
    wait_for(lambda: not list(state.glob("*.json")), timeout=60, what="members of the deleted group stopped")
    assert gw.admin.get("/admin/instances/kept-1").status_code == 404


def test_a_controller_killed_mid_scale_out_adopts_the_process_it_started(gw: Gateway) -> None:
    # Each member waits 3 s before listening: the second one runs, not yet healthy, when the controller is
    # killed (SIGKILL) in the middle of that scale-out.
    command = {"argv": stub_argv("--start-delay-ms", "3000"), "cwd": str(ROOT)}
    doc = group_doc("midway", port_range(21), command=command, min_instances=2, max_instances=2, triggers={})
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
    state = gw.home / "scaling" / "midway"

    def started() -> dict[str, int]:
        return {f.stem: json.loads(f.read_text())["pid"] for f in state.glob("*.json")}

    wait_for(
        lambda: set(started()) == {"midway-1", "midway-2"} and serving(gw, "midway") == ["midway-1"],
        timeout=60,
        interval=0.05,
        what="the second member started, not yet serving",
    )
    pids = started()
    gw.kill_controller()
    gw.start_controller()
    wait_for(lambda: serving(gw, "midway") == ["midway-1", "midway-2"], timeout=60, what="both serving")
    adopted = wait_for(
        lambda: [e for e in events(gw, "midway") if e["direction"] == "adopt"],
        timeout=20,
        what="the adoption's event",  # written once nginx serves it
    )
    assert [(e["instance"], e["outcome"]) for e in adopted] == [("midway-2", "ok")], adopted
    assert {m["name"]: m["pid"] for m in members(gw, "midway")} == pids  # the same processes, no duplicate
    # The interrupted scale-out left no event; the process it started is the one adopted.
    assert [e["instance"] for e in events(gw, "midway") if e["direction"] == "out"] == ["midway-1"]
    assert gw.admin.delete("/admin/scaling/groups/midway").status_code == 204


def test_groups_round_trip_through_export_and_import(gw: Gateway) -> None:
    ports = port_range(21)
    # min_instances 0 and no trigger: the group starts nothing.
    doc = group_doc("carried", ports, min_instances=0, triggers={})
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
    stored = gw.admin.get("/admin/scaling/groups/carried").json()["group"]
    exported = gw.admin.get("/admin/config/export").json()
    assert exported["scaling_groups"] == [stored]
    yaml_text = gw.admin.get("/admin/config/export", params={"format": "yaml"}).text
    assert "scaling_groups:" in yaml_text and "carried" in yaml_text

    # Bad groups in a document: 422 naming the field, nothing changed (groups or instances).
    before = gw.admin.get("/admin/config/export").json()
    refused = {**exported, "scaling_groups": [{**stored, "command": {"argv": ["/bin/sh", "-c", "true"]}}]}
    for bad, field in (
        (refused, "scaling_groups[0].command.argv.0"),
        (
            {**exported, "scaling_groups": [{**stored, "min_instances": "1"}]},
            "scaling_groups[0].min_instances",
        ),
        ({**exported, "scaling_groups": [stored, stored]}, "scaling_groups[1].name"),
    ):
        r = gw.admin.post("/admin/config/import", json=bad, params={"mode": "replace"})
        assert r.status_code == 422, r.text
        assert field in [e["field"] for e in r.json()["detail"]], r.text
    assert gw.admin.get("/admin/config/export").json() == before

    # Replace without scaling_groups: the groups stay; with them: they are what the document says.
    without = {k: val for k, val in exported.items() if k != "scaling_groups"}
    assert gw.admin.post("/admin/config/import", json=without, params={"mode": "replace"}).status_code == 200
    assert gw.admin.get("/admin/scaling/groups/carried").json()["group"] == stored
    assert gw.admin.delete("/admin/scaling/groups/carried").status_code == 204
    r = gw.admin.post(
        "/admin/config/import",
        content=yaml_text,
        headers={"Content-Type": "application/yaml"},
        params={"mode": "merge"},
    )
    assert r.status_code == 200, r.text
    assert gw.admin.get("/admin/scaling/groups/carried").json()["group"] == stored
    assert gw.admin.get("/admin/config/export").json() == exported
    emptied = {**exported, "scaling_groups": []}
    assert gw.admin.post("/admin/config/import", json=emptied, params={"mode": "replace"}).status_code == 200
    assert gw.admin.get("/admin/scaling/groups").json() == {"groups": []}


def test_a_queue_reported_by_vllm_metrics_scales_out_then_in(gw: Gateway) -> None:
    ports = port_range(21)
    doc = group_doc(
        "queued",
        ports,
        max_instances=2,
        template={"provider_type": "vllm", "api_path": "/v1", "health": {"probe_interval_s": 1}},
        triggers={"queue_depth": {"scale_out_above": 4, "scale_in_below": 1}},
        sustain_s=0.5,
        cooldown_in_s=2,
    )
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
    wait_for(lambda: serving(gw, "queued") == ["queued-1"], timeout=40, what="the first member")
    first = members(gw, "queued")[0]["port"]
    # The stand-in's GET /metrics reports vllm:num_requests_waiting as set here (no traffic needed).
    assert httpx.post(f"http://127.0.0.1:{first}/_load", json={"waiting": 10}).status_code == 200

    def scaled(direction: str) -> list[dict[str, Any]]:
        found = events(gw, "queued")
        return [e for e in found if e["direction"] == direction and e["trigger"] != "min_instances"]

    wait_for(lambda: scaled("out"), timeout=40, what="a scale-out on the queue")
    (out,) = scaled("out")
    assert (out["outcome"], out["trigger"], out["from"], out["to"]) == ("ok", "queue_depth", 1, 2), out
    (seen,) = out["measured"]
    assert (seen["trigger"], seen["value"], seen["scale_out_above"]) == ("queue_depth", 10.0, 4.0), out
    assert serving(gw, "queued") == ["queued-1", "queued-2"]
    # The status page's view: serving against desired and the newest events.
    (view,) = [g for g in gw.admin.get("/admin/overview").json()["scaling"] if g["name"] == "queued"]
    assert (view["current"], view["min"], view["max"]) == (2, 1, 2), view
    assert view["events"][0]["direction"] == "out" and view["events"][0]["counts"] == "1 \u2192 2", view

    def measured() -> float | None:
        triggers = gw.admin.get("/admin/scaling/groups/queued").json()["evaluation"]["triggers"]
        return float(triggers[0]["value"]) if triggers[0]["value"] is not None else None

    # 10 waiting on one member, none on the new one: 5 per member, over 4 but at max_instances.
    wait_for(lambda: measured() == 5.0, timeout=10, what="the queue measured over both members")
    assert "max_instances 2" in gw.admin.get("/admin/scaling/groups/queued").json()["evaluation"]["reason"]
    assert httpx.post(f"http://127.0.0.1:{first}/_load", json={"waiting": 0}).status_code == 200
    wait_for(lambda: scaled("in"), timeout=40, what="a scale-in once the queue is gone")
    (scaled_in,) = scaled("in")
    assert scaled_in["outcome"] == "ok" and scaled_in["measured"][0]["value"] == 0.0, scaled_in
    assert serving(gw, "queued") == ["queued-1"]
    assert gw.admin.delete("/admin/scaling/groups/queued").status_code == 204
    state = gw.home / "scaling" / "queued"
    wait_for(lambda: not list(state.glob("*.json")), timeout=60, what="members of the deleted group stopped")


def test_without_a_docker_engine_the_controller_warns_of_nothing(gw: Gateway) -> None:
    """The docker driver is made at every start; without an engine and without a docker group it stays
    silent (its client does not reach the engine until a docker group needs it)."""
    assert not os.path.exists(NO_DOCKER)
    gw.kill_controller()
    gw.start_controller()
    # A command group that starts nothing: its first evaluation shows that scaling passes ran (each one
    # first asks the docker driver what the engine runs, when it has not yet been able to).
    doc = group_doc("quiet", port_range(21), min_instances=0, triggers={})
    assert gw.admin.post("/admin/scaling/groups", json=doc).status_code == 201
    evaluated = wait_for(
        lambda: gw.admin.get("/admin/scaling/groups/quiet").json()["last_decision"],
        timeout=10,
        what="an evaluation",
    )
    assert evaluated["direction"] == "hold"
    assert gw.admin.delete("/admin/scaling/groups/quiet").status_code == 204
    text = (gw.home / "controller.log").read_text()
    warnings = [line for line in text.splitlines() if " WARNING " in line and "docker" in line.lower()]
    assert warnings == [], warnings
