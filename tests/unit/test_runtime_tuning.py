"""control_plane/runtime_tuning.py: what `python -m control_plane` sets first."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from control_plane.runtime_tuning import (
    OLDEST_GENERATION_THRESHOLD,
    collect_oldest_less_often,
    limit_malloc_arenas,
)


def test_an_explicit_malloc_arena_max_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_glibc_takes_the_arena_limit() -> None:
    """In a process of its own (the limit is process-wide): glibc's mallopt accepts it."""
    code = "from control_plane.runtime_tuning import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"


def test_the_oldest_generation_is_collected_less_often() -> None:
    before = gc.get_threshold()
    try:
        collect_oldest_less_often()
        assert gc.get_threshold() == (before[0], before[1], OLDEST_GENERATION_THRESHOLD)
    finally:
        gc.set_threshold(*before)


TRIM_PROBE = """
from control_plane.runtime_tuning import malloc_trimmer

def rss_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

blocks = [bytearray(64 * 1024) for _ in range(1600)]  # 100 MB of glibc's heap (below its mmap threshold)
pinned = blocks[-1]  # a live block at the top: glibc's own trimming of the heap's top cannot free below it
del blocks
before = rss_kb()
trim = malloc_trimmer()
trim()
print(before - rss_kb())
"""


def test_malloc_trim_gives_free_heap_pages_back() -> None:
    """In a process of its own: 100 MB freed under a live block stay resident until malloc_trim(0)."""
    env = {"PATH": "/usr/bin:/bin", "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, env=env, check=True
    )
    assert int(out.stdout) > 80 * 1024  # kB given back
