"""Load signals backends expose, read by the weights service's probes (never on the request path). Pure.

vLLM's Prometheus /metrics: requests waiting and running, KV-cache use; Ollama's /api/ps: which models are
loaded (a cold model answers its first request only after loading it)."""

from __future__ import annotations

import json
import re

QUEUE_FULL = 8  # requests waiting at which an instance counts as saturated
CACHE_BUSY = 0.8  # KV-cache use above which an instance counts as filling up (to 1.0: saturated)
COLD = 1.0  # the load of a model an Ollama instance has not loaded
VLLM_METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc")
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")


def prometheus_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The sum over label sets of each named metric (vLLM labels them by model_name); others ignored."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None or match["name"] not in names:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if value == value and abs(value) != float("inf"):  # NaN and infinities say nothing
            sums[match["name"]] = sums.get(match["name"], 0.0) + value
    return sums


def vllm_load(text: str) -> tuple[float, str] | None:
    """0 idle .. 1 saturated, and why; None when the text holds none of vLLM's metrics."""
    sums = prometheus_sums(text, VLLM_METRICS)
    if not sums:
        return None
    waiting = sums.get("vllm:num_requests_waiting", 0.0)
    running = sums.get("vllm:num_requests_running", 0.0)
    cache = sums.get("vllm:gpu_cache_usage_perc", 0.0)
    queue = min(1.0, max(0.0, waiting) / QUEUE_FULL)
    filling = min(1.0, max(0.0, (cache - CACHE_BUSY) / (1 - CACHE_BUSY)))
    load = max(queue, filling)
    return load, f"vLLM: {waiting:g} waiting, {running:g} running, KV cache {cache:.0%}"


def ollama_loaded(body: bytes) -> frozenset[str] | None:
    """The models an Ollama /api/ps answer says are loaded; None when it is no such answer."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    names = set()
    for item in models:
        if isinstance(item, dict):
            for key in ("name", "model"):
                if isinstance(item.get(key), str):
                    names.add(item[key])
    return frozenset(names)


def ollama_load(model: str, loaded: frozenset[str]) -> tuple[float, str]:
    """A model not loaded is cold: its first request waits for the load. "m" and "m:latest" are one."""
    spellings = {model, model.removesuffix(":latest"), f"{model}:latest"}
    if spellings & loaded:
        return 0.0, "Ollama: model loaded"
    return COLD, "Ollama: model not loaded (cold)"
