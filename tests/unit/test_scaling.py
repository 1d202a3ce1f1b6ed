"""The autoscaler's pure parts: group validation, measuring a window, deciding, the trend."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from docker.errors import APIError, ImageNotFound
from docker.models.containers import _create_container_args  # type: ignore[attr-defined]  # private, not in the stubs
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from control_plane.errors import InvalidInput
from control_plane.nginx_process import NginxProcess
from control_plane.registry import importers
from control_plane.registry.models import RoutingConfig
from control_plane.registry.scaling import ScalingStore
from control_plane.registry.store import Store
from control_plane.scaling import service as scaling_service
from control_plane.scaling.command import CommandDriver
from control_plane.scaling.decide import (
    Memory,
    Sample,
    Signals,
    decide,
    measure,
    percentile,
    queue_depth,
    trend_rpm,
)
from control_plane.scaling.docker import (
    API_VERSION,
    DockerDriver,
    DockerError,
    container_name,
    container_spec,
    explain,
    member_of,
    socket_path,
)
from control_plane.scaling.drivers import Drivers
from control_plane.scaling.model import DockerLaunch, ScalingGroup, substitute
from control_plane.settings import Settings
from tests.unit.test_reconciler import make_loop


def group(**changes: Any) -> ScalingGroup:
    doc: dict[str, Any] = {
        "name": "llama",
        "models": ["llama3"],
        "command": {"argv": ["/usr/bin/server", "--port", "{port}"]},
        "min_instances": 1,
        "max_instances": 4,
        "cooldown_out_s": 30,
        "cooldown_in_s": 60,
        "evaluation_interval_s": 10,
        "sustain_s": 10,
        "template": {"max_concurrent_requests": 4},
        "triggers": {"utilisation": {"scale_out_above": 0.8, "scale_in_below": 0.3}},
    }
    doc.update(changes)
    return ScalingGroup.model_validate(doc)


def signals(members: int, utilisation: float | None, rpm: float = 60.0) -> Signals:
    return Signals(members=members, values={"utilisation": utilisation}, rpm=rpm)


# --- the group document ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"min_instances": 5, "max_instances": 4}, "min_instances"),
        ({"triggers": {"utilisation": {"scale_out_above": 0.5, "scale_in_below": 0.5}}}, "scale_in_below"),
        ({"port_min": 30000, "port_max": 30001}, "port range"),
        ({"name": "x" * 57}, "characters"),
        ({"command": {"argv": []}}, "argv"),
        ({"command": {"argv": ["/bin/a\x00b"]}}, "NUL"),
        ({"command": {"argv": ["/bin/a"], "env": {"A=B": "c"}}}, "env"),
        ({"template": {"api_path": "/v1/../x"}}, "api_path"),
        ({"driver": "ssh"}, "driver"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_groups_are_refused_naming_the_problem(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        group(**changes)
    assert field in str(caught.value)


def test_member_config_and_placeholders() -> None:
    g = group(template={"api_path": "/v1", "weight": 3, "max_concurrent_requests": 2})
    config = g.member_config(2, 20002)
    assert config.name == "llama-2"
    assert config.api_base == "http://127.0.0.1:20002/v1"
    assert config.supported_models == ["llama3"] and config.weight == 3
    assert config.tags == ["scaling_group=llama"]
    text = "--port={port} --name {name} #{index} {other}"
    assert substitute(text, 9, "n", 2) == "--port=9 --name n #2 {other}"


# --- measuring ---------------------------------------------------------------------------------------------


def test_measure_little_law_p95_errors() -> None:
    g = group()
    now = 1000.0
    # 60 attempts of 2 s each in the last 60 s: 120 busy seconds over 60 s = 2 in flight on average.
    samples = [Sample(now - i, 2000.0, i % 10 != 0) for i in range(60)]
    samples.append(Sample(now - 100, 99_999.0, False))  # outside the window
    s = measure(g, samples, now, 60.0, members=1, unhealthy=0)
    assert s.rpm == pytest.approx(60.0)
    assert s.values["utilisation"] == pytest.approx(2 / 4)  # 2 in flight over 1 member x 4
    assert s.values["p95_latency_ms"] == 2000.0
    assert s.values["error_rate"] == pytest.approx(6 / 60)
    idle = measure(g, [], now, 60.0, members=2, unhealthy=1)
    assert idle.values["utilisation"] == 0.0 and idle.values["p95_latency_ms"] is None
    assert idle.values["error_rate"] is None and idle.values["unhealthy_instances"] == 1.0


def test_measure_by_rpm_when_only_max_rpm_is_set() -> None:
    g = group(template={"max_rpm": 30})
    samples = [Sample(100.0 - i, 10.0, True) for i in range(30)]
    # 30 requests in 60 s: 30 per minute over 2 members x 30.
    measured = measure(g, samples, 100.0, 60.0, members=2, unhealthy=0)
    assert measured.values["utilisation"] == pytest.approx(0.5)
    none = group(template={})
    assert measure(none, samples, 100.0, 60.0, members=2, unhealthy=0).values["utilisation"] is None


def test_queue_depth_is_the_mean_waiting_over_the_members_that_report_it() -> None:
    vllm = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 3.0\n'
        'vllm:num_requests_waiting{model_name="b"} 2.0\n'
        'vllm:num_requests_running{model_name="a"} 9.0\n'
    )
    assert queue_depth([vllm]) == 5.0  # summed over its label sets
    assert queue_depth([vllm, "vllm:num_requests_waiting 1\n"]) == 3.0
    # A member that did not answer, or answered without the metric, is left out; none at all: unmeasurable.
    assert queue_depth([vllm, None, "", "other_metric 7\n", "vllm:num_requests_waiting NaN\n"]) == 5.0
    assert queue_depth([None, "vllm:num_requests_running 4\n"]) is None
    assert queue_depth([]) is None
    assert queue_depth(["vllm:num_requests_waiting -2\n"]) == 0.0
    measured = measure(group(), [], 10.0, 60.0, members=2, unhealthy=0, queue_depth=5.0)
    assert measured.values["queue_depth"] == 5.0


def test_percentile_nearest_rank() -> None:
    assert percentile([5.0], 0.95) == 5.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0


# --- deciding ----------------------------------------------------------------------------------------------


def test_scale_out_only_after_the_trigger_held_for_sustain_s() -> None:
    g = group()
    d, m = decide(g, signals(1, 0.9), Memory(), 0.0)
    assert d.direction == "hold" and d.reason == "utilisation over its threshold for 0 s of sustain_s 10"
    d, m = decide(g, signals(1, 0.9), m, 5.0)
    assert d.direction == "hold"
    d, m = decide(g, signals(1, 0.9), m, 10.0)
    assert (d.direction, d.target, d.trigger) == ("out", 2, "utilisation")
    assert "utilisation 0.9 > 0.8 for 10 s" in d.reason
    assert d.triggers[0].value == 0.9 and d.triggers[0].over_for_s == 10.0


def test_a_dip_restarts_the_sustain_clock() -> None:
    g = group()
    _, m = decide(g, signals(1, 0.9), Memory(), 0.0)
    _, m = decide(g, signals(1, 0.5), m, 5.0)
    d, m = decide(g, signals(1, 0.9), m, 10.0)
    assert d.direction == "hold"
    d, _ = decide(g, signals(1, 0.9), m, 20.0)
    assert d.direction == "out"


def test_cooldown_out_and_max_instances_hold() -> None:
    g = group()
    memory = Memory(over_since={"utilisation": 0.0}, last_out_at=50.0)
    d, _ = decide(g, signals(2, 0.95), memory, 60.0)
    assert d.direction == "hold" and d.cooldown_out_left_s == 20.0 and "cooldown_out" in d.reason
    d, _ = decide(g, signals(2, 0.95), memory, 80.0)
    assert d.direction == "out"
    d, _ = decide(g, signals(4, 0.95), memory, 80.0)
    assert d.direction == "hold" and "max_instances 4" in d.reason


def test_scale_in_needs_every_trigger_under_for_cooldown_in_s() -> None:
    g = group(
        triggers={
            "utilisation": {"scale_out_above": 0.8, "scale_in_below": 0.3},
            "p95_latency_ms": {"scale_out_above": 5000, "scale_in_below": 1000},
        }
    )
    both_low = Signals(3, {"utilisation": 0.1, "p95_latency_ms": 200.0}, 10.0)
    one_high = Signals(3, {"utilisation": 0.1, "p95_latency_ms": 3000.0}, 10.0)
    d, m = decide(g, both_low, Memory(), 0.0)
    assert d.direction == "hold" and d.cooldown_in_left_s == 60.0
    d, m = decide(g, one_high, m, 30.0)  # in the band: neither out nor in, and the in clock restarts
    assert d.direction == "hold" and m.all_under_since is None
    d, m = decide(g, both_low, m, 40.0)
    d, m = decide(g, both_low, m, 99.0)
    assert d.direction == "hold"
    d, m = decide(g, both_low, m, 100.0)
    assert (d.direction, d.target) == ("in", 2)
    d, _ = decide(g, Signals(1, {"utilisation": 0.0, "p95_latency_ms": None}, 0.0), m, 500.0)
    assert d.direction == "hold"  # never below min_instances


def test_queue_depth_scales_out_and_an_unreported_queue_does_not_hold_a_scale_in() -> None:
    g = group(
        sustain_s=0,
        triggers={
            "utilisation": {"scale_out_above": 0.8, "scale_in_below": 0.3},
            "queue_depth": {"scale_out_above": 4, "scale_in_below": 1},
        },
    )
    queued = Signals(2, {"utilisation": 0.2, "queue_depth": 6.0}, 10.0)
    d, _ = decide(g, queued, Memory(), 0.0)
    assert (d.direction, d.target, d.trigger) == ("out", 3, "queue_depth")
    assert "queue_depth 6 > 4" in d.reason
    view = {t.name: t for t in d.triggers}["queue_depth"]
    assert (view.value, view.scale_out_above, view.scale_in_below) == (6.0, 4.0, 1.0)
    waiting = Signals(2, {"utilisation": 0.1, "queue_depth": 2.0}, 10.0)  # in the band: no scale in
    d, m = decide(g, waiting, Memory(), 0.0)
    assert d.direction == "hold" and m.all_under_since is None
    unreported = Signals(2, {"utilisation": 0.1, "queue_depth": None}, 10.0)
    _, m = decide(g, unreported, Memory(), 0.0)
    d, _ = decide(g, unreported, m, 60.0)
    assert (d.direction, d.target) == ("in", 1)


def test_no_scale_in_soon_after_a_scale_out() -> None:
    g = group()
    memory = Memory(all_under_since=0.0, last_out_at=90.0)
    d, _ = decide(g, signals(2, 0.0), memory, 100.0)
    assert d.direction == "hold" and d.cooldown_in_left_s == 50.0


def test_bounds_come_first() -> None:
    g = group(min_instances=2)
    d, _ = decide(g, signals(0, None), Memory(last_out_at=1e9), 0.0)
    assert (d.direction, d.target, d.trigger) == ("out", 2, "min_instances")
    d, _ = decide(g, signals(6, 0.95), Memory(), 0.0)
    assert (d.direction, d.target, d.trigger) == ("in", 4, "max_instances")


def test_predictive_scale_out_ahead_of_the_threshold() -> None:
    g = group(predictive=True, predictive_window_s=600)
    memory = Memory(rpm_history=((0.0, 100.0), (10.0, 200.0), (20.0, 300.0)))
    d, _ = decide(g, signals(1, 0.6, rpm=400.0), memory, 30.0)
    assert d.direction == "out" and d.predictive and d.reason.startswith("predictive:")
    flat = Memory(rpm_history=((0.0, 400.0), (10.0, 400.0), (20.0, 400.0)))
    d, _ = decide(g, signals(1, 0.6, rpm=400.0), flat, 30.0)
    assert d.direction == "hold" and not d.predictive
    d, _ = decide(group(), signals(1, 0.6, rpm=400.0), memory, 30.0)
    assert d.direction == "hold"  # predictive off


def test_trend_rpm() -> None:
    assert trend_rpm(((0.0, 10.0), (10.0, 20.0)), 20.0) is None
    assert trend_rpm(((0.0, 10.0), (10.0, 20.0), (20.0, 30.0)), 40.0) == pytest.approx(50.0)


@settings(max_examples=300, deadline=None)
@given(
    members=st.integers(0, 8),
    values=st.lists(st.one_of(st.none(), st.floats(0, 2)), min_size=20, max_size=20),
)
def test_decisions_stay_within_bounds_and_move_one_step(members: int, values: list[float | None]) -> None:
    g = group()
    memory = Memory()
    for step, value in enumerate(values):
        d, memory = decide(g, signals(members, value), memory, step * 10.0)
        if d.trigger not in ("min_instances", "max_instances"):
            assert g.min_instances <= d.target <= g.max_instances
            assert abs(d.target - d.current) <= 1
        if d.direction == "out":
            memory = Memory(**{**memory.__dict__, "last_out_at": step * 10.0})
            members = d.target
        elif d.direction == "in":
            memory = Memory(**{**memory.__dict__, "last_in_at": step * 10.0})
            members = d.target


# --- in the export/import document ------------------------------------------------------------------------


def test_groups_round_trip_through_the_document() -> None:
    groups = [group(), group(name="qwen", models=["qwen3"], predictive=True)]
    document = importers.export_groups(importers.export_document([], RoutingConfig()), groups)
    for fmt in importers.FORMATS:
        loaded = importers.load(importers.dump(document, fmt), fmt)
        assert importers.parse_groups(loaded) == groups
        assert importers.parse_document(loaded, {}) == ([], RoutingConfig())
    without = importers.export_groups(importers.export_document([], RoutingConfig()), [])
    assert "scaling_groups" not in without  # a registry without groups exports as before
    assert importers.parse_groups(without) is None  # and its import leaves the groups as they are
    assert importers.parse_groups({"scaling_groups": []}) == []


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"scaling_groups": {"llama": {}}}, "scaling_groups"),
        ({"scaling_groups": ["x"]}, "scaling_groups[0]"),
        ({"scaling_groups": [{"name": "a"}]}, "scaling_groups[0].models"),
        ({"scaling_groups": [{**group().model_dump(mode="json"), "min_instances": 9}]}, "scaling_groups[0]"),
        (
            {"scaling_groups": [group().model_dump(mode="json"), group().model_dump(mode="json")]},
            "scaling_groups[1].name",
        ),
    ],
)
def test_bad_groups_in_a_document_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        importers.parse_groups(raw)
    assert any(e["field"].startswith(field) for e in caught.value.errors), caught.value.errors


# --- the docker driver's pure parts ------------------------------------------------------------------------


def docker_group(**docker: Any) -> ScalingGroup:
    spec = {"image": "localhost/vllm:1", **docker}
    return group(name="gpu", driver="docker", command=None, docker=spec)


def test_a_group_has_the_launch_spec_of_its_driver_only() -> None:
    assert docker_group().docker is not None and docker_group().command is None
    for changes, message in (
        ({"driver": "docker"}, "needs its launch spec 'docker'"),  # and keeps the command spec
        ({"command": None}, "needs its launch spec 'command'"),
        ({"docker": {"image": "a:1"}}, "'docker' is the launch spec of driver docker"),
        ({"driver": "docker", "command": None, "docker": {"image": "a b"}}, "image"),
        ({"driver": "docker", "command": None, "docker": {"image": "a", "gpus": 0}}, "gpus"),
        ({"driver": "docker", "command": None, "docker": {"image": "a", "env": {"A=": "b"}}}, "env"),
        ({"driver": "docker", "command": None, "docker": {"image": "a", "privileged": True}}, "privileged"),
    ):
        with pytest.raises(ValidationError) as caught:
            group(**changes)
        assert message in str(caught.value), (changes, str(caught.value))


def wire_body(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Engine API create body the SDK makes of ``containers.create`` keyword arguments, made by the
    SDK's own code (a client with a fixed API version never reaches an engine)."""
    client = docker.APIClient(base_url="unix:///nonexistent/docker.sock", version=API_VERSION)
    args = _create_container_args({**kwargs, "version": API_VERSION})
    return dict(client.create_container_config(**args))


def test_container_spec_publishes_on_loopback_with_labels_and_placeholders() -> None:
    g = docker_group(
        command=["--port", "8000", "--served-model-name", "{name}"],
        env={"SLOT": "{index}", "PUBLIC": "127.0.0.1:{port}"},
        container_port=8000,
        gpus="all",
    )
    kwargs = container_spec(g, g.docker, "abc123", 2, 20005)  # type: ignore[arg-type]
    assert set(kwargs) == {
        "image",
        "command",
        "environment",
        "labels",
        "ports",
        "restart_policy",
        "device_requests",
    }  # nothing else: no privileges, no mounts, no host network
    assert kwargs["ports"] == {"8000/tcp": ("127.0.0.1", 20005)}
    assert container_name("abc123", g, 2) == "ishgw-abc123-gpu-2"
    body = wire_body(kwargs)
    assert body["Image"] == "localhost/vllm:1"
    assert body["Cmd"] == ["--port", "8000", "--served-model-name", "gpu-2"]
    assert body["Env"] == ["PUBLIC=127.0.0.1:20005", "SLOT=2"]
    assert body["ExposedPorts"] == {"8000/tcp": {}}
    host = body["HostConfig"]
    assert host["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "20005"}]}
    (gpus,) = host["DeviceRequests"]
    assert (gpus["Driver"], gpus["Count"], gpus["Capabilities"]) == ("", -1, [["gpu"]])
    assert host["RestartPolicy"] == {"Name": "no"}
    assert (
        not host.get("Privileged") and not host.get("Binds") and host.get("NetworkMode") in (None, "default")
    )
    labels = body["Labels"]
    assert labels == {
        "io.ishgw.gateway": "abc123",
        "io.ishgw.group": "gpu",
        "io.ishgw.member": "gpu-2",
        "io.ishgw.index": "2",
        "io.ishgw.port": "20005",
    }
    plain = docker_group()
    kwargs = container_spec(plain, plain.docker, "abc123", 1, 20001)  # type: ignore[arg-type]
    body = wire_body(kwargs)
    assert body.get("Cmd") is None and "DeviceRequests" not in body["HostConfig"]  # the image's own command
    assert body["ExposedPorts"] == {"20001/tcp": {}}  # no container_port: {port} inside too
    counted = container_spec(plain, DockerLaunch(image="a", gpus=2), "x", 1, 1)
    assert wire_body(counted)["HostConfig"]["DeviceRequests"][0]["Count"] == 2

    # Back from the engine's container list: ours by the gateway label, the container id kept.
    listed = {"Id": "f" * 64, "Labels": labels, "State": "running"}
    member = member_of(listed, "abc123")
    assert member is not None and (member.name, member.index, member.port, member.driver) == (
        "gpu-2",
        2,
        20005,
        "docker",
    )
    assert member.started == "f" * 64
    assert member_of(listed, "other-gateway") is None
    assert member_of({"Id": "x", "Labels": {**labels, "io.ishgw.port": "x"}}, "abc123") is None
    assert member_of({"Id": "x", "Labels": None}, "abc123") is None


def test_engine_errors_say_what_the_engine_said() -> None:
    response = requests.Response()
    response.status_code, response.url, response.reason = 404, "http://docker/v1.41/containers/create", "NF"
    missing = ImageNotFound("404", response=response, explanation="no such image: localhost/x:1")
    assert explain(missing) == "404 no such image: localhost/x:1"
    assert explain(APIError("500", response=response, explanation="")).startswith("404 Client Error")
    assert explain(ConnectionError()) == "ConnectionError"


def test_making_the_driver_does_not_reach_the_engine(tmp_path: Path) -> None:
    """No Docker on this machine: the driver is made (the controller starts) without a call to the engine;
    the first call fails as a DockerError naming the socket."""
    driver = DockerDriver(f"unix://{tmp_path}/none.sock", tmp_path, frozenset({"localhost/vllm:1"}))
    assert driver.client.api.api_version == API_VERSION
    with pytest.raises(DockerError, match=r"none\.sock"):
        asyncio.run(driver.refresh())
    assert not driver.refreshed
    asyncio.run(driver.close())


def test_docker_host_is_a_unix_socket() -> None:
    assert socket_path("unix:///run/podman/podman.sock") == "/run/podman/podman.sock"
    for bad in ("tcp://127.0.0.1:2375", "unix://", "/run/docker.sock"):
        with pytest.raises(ValueError):
            socket_path(bad)


def test_docker_host_falls_back_to_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ISHGW_DOCKER_HOST", "DOCKER_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().docker_host == "unix:///var/run/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/podman/podman.sock")
    assert Settings().docker_host == "unix:///run/podman/podman.sock"
    monkeypatch.setenv("ISHGW_DOCKER_HOST", "unix:///run/docker.sock")
    assert Settings().docker_host == "unix:///run/docker.sock"


def test_without_a_docker_group_an_unreadable_engine_is_not_read_every_pass(tmp_path: Path) -> None:
    """No Docker on this machine and no docker group: the first pass tries the engine (members of a group
    deleted while the controller was down), the passes after it do not, until DOCKER_RETRY_S has passed."""

    async def body() -> int:
        store = Store("sqlite://")
        store.migrate()
        docker_driver = DockerDriver(f"unix://{tmp_path}/none.sock", tmp_path)
        attempts = 0
        refresh = docker_driver.refresh

        async def counted() -> None:
            nonlocal attempts
            attempts += 1
            await refresh()

        docker_driver.refresh = counted  # type: ignore[method-assign]
        service = scaling_service.ScalingService(
            ScalingStore(store),
            store,
            make_loop().reconciler,
            NginxProcess(tmp_path / "nginx"),
            Drivers(CommandDriver(tmp_path / "scaling", frozenset()), docker_driver),
            None,  # type: ignore[arg-type]  # not reached: no group
            dict,
        )
        for _ in range(5):
            await service.tick()
        assert attempts == 1
        service._docker_failed_at = -scaling_service.DOCKER_RETRY_S  # as if long ago
        await service.tick()
        await docker_driver.close()
        return attempts

    assert asyncio.run(body()) == 2
