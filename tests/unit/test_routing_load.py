"""Load signals from backends (vLLM /metrics, Ollama /api/ps): parsing and their effect on weights."""

from __future__ import annotations

import pytest

from control_plane.routing import weights as lw
from control_plane.routing.load import COLD, ollama_load, ollama_loaded, prometheus_sums, vllm_load

VLLM = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 4.0
vllm:num_requests_waiting{model_name="b"} 4.0
vllm:num_requests_running{model_name="a"} 7.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.5
vllm:num_requests_waiting_total 99
other_metric 5
"""


def test_prometheus_sums_over_label_sets_only_named_metrics() -> None:
    sums = prometheus_sums(
        VLLM + "vllm:num_requests_running NaN\nvllm:num_requests_running x\n",
        (
            "vllm:num_requests_waiting",
            "vllm:num_requests_running",
        ),
    )
    assert sums == {"vllm:num_requests_waiting": 8.0, "vllm:num_requests_running": 7.0}


@pytest.mark.parametrize(
    ("text", "load"),
    [
        (VLLM, 1.0),  # 8 waiting: a full queue
        ("vllm:num_requests_waiting 2\n", 0.25),
        ("vllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.9\n", 0.5),
        ("vllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.3\n", 0.0),
        ("vllm:num_requests_waiting -3\n", 0.0),
    ],
)
def test_vllm_load(text: str, load: float) -> None:
    found = vllm_load(text)
    assert found is not None and found[0] == pytest.approx(load)


def test_vllm_load_needs_vllm_metrics() -> None:
    assert vllm_load("") is None and vllm_load("<html>") is None and vllm_load("up 1\n") is None
    assert vllm_load(VLLM) == (1.0, "vLLM: 8 waiting, 7 running, KV cache 50%")


def test_ollama_loaded_models_and_cold_ones() -> None:
    loaded = ollama_loaded(b'{"models":[{"name":"llama3:latest","model":"llama3:latest"},{"model":"q"},7]}')
    assert loaded == frozenset({"llama3:latest", "q"})
    assert ollama_load("llama3", loaded)[0] == 0.0
    assert ollama_load("llama3:latest", loaded)[0] == 0.0
    assert ollama_load("mistral", loaded) == (COLD, "Ollama: model not loaded (cold)")
    assert (
        ollama_loaded(b"[]") is None
        and ollama_loaded(b"{") is None
        and ollama_loaded(b'{"models":1}') is None
    )
    assert ollama_loaded(b'{"models":[]}') == frozenset()


def test_a_queueing_or_cold_instance_gets_less_weight() -> None:
    idle = lw.Observation("idle", 100, 100, 100.0)
    busy = lw.Observation(
        "busy", 100, 100, 100.0, load=1.0, load_note="vLLM: 20 waiting, 4 running, KV cache 50%"
    )
    for strategy in sorted(lw.MEASURED):
        choices = {c.name: c for c in lw.decide(strategy, [idle, busy], 0.05, lw.Reward(), "s")}
        assert choices["busy"].weight < choices["idle"].weight, strategy
    least = {c.name: c for c in lw.least_response_time([idle, busy])}
    assert least["busy"].weight == 50
    assert least["busy"].reasons[-2:] == ("load 100%", "vLLM: 20 waiting, 4 running, KV cache 50%")
