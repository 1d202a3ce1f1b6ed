"""Process-wide settings of the Python runtime for a controller of 10,000 instances (issue 17): applied once,
first thing in `python -m control_plane`.

- glibc malloc arenas: each thread that allocates gets an arena of its own (up to 8 per core). The
  registry's reads and writes run in asyncio.to_thread workers and parse and drop thousands of states a
  minute; with an arena per worker the controller's RSS kept growing by about 10 MB a minute at 10,000
  instances (tracemalloc saw the Python heap flat meanwhile). Two arenas (glibc's mallopt M_ARENA_MAX,
  what MALLOC_ARENA_MAX=2 sets) hold it steady. An explicit MALLOC_ARENA_MAX in the environment wins;
  without glibc nothing is changed.
- the cyclic garbage collector: at 10,000 instances about 440,000 objects are tracked, and a collection
  of the oldest generation paused the event loop for 250-600 ms, about every 12 s (the states a pass reads
  survive the young generations). Such a collection now runs after ten times as many collections of the
  middle generation: the pauses come about ten times less often (garbage without cycles is freed at once
  whatever the collector does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

M_ARENA_MAX = -8  # glibc malloc.h
MALLOC_ARENAS = 2
OLDEST_GENERATION_THRESHOLD = 100  # CPython's default: 10


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """True when glibc now keeps at most ``count`` arenas."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def collect_oldest_less_often(threshold: int = OLDEST_GENERATION_THRESHOLD) -> None:
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, threshold)


def tune() -> None:
    limit_malloc_arenas()
    collect_oldest_less_often()
