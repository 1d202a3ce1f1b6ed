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
- free memory back to the system: glibc returns freed memory to the kernel only from the top of its
  heap. Each pass reads and drops thousands of states and rows, and the holes they leave (whole free pages
  among live data) stay resident: at 10,000 instances a third of glibc's heap was free and resident after
  ten minutes (mallinfo2: 30 of 76 MB), and malloc_trim(0) gave back 20-25 MB of RSS. The app calls it
  every TRIM_INTERVAL_S from a worker thread (trim_periodically): 20-40 ms of a thread a minute.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable

M_ARENA_MAX = -8  # glibc malloc.h
MALLOC_ARENAS = 2
OLDEST_GENERATION_THRESHOLD = 100  # CPython's default: 10
TRIM_INTERVAL_S = 60.0

log = logging.getLogger(__name__)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """True when glibc now keeps at most ``count`` arenas."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    try:
        return libc is not None and bool(libc.mallopt(M_ARENA_MAX, count))
    except AttributeError:  # not glibc (musl has no mallopt)
        return False


def collect_oldest_less_often(threshold: int = OLDEST_GENERATION_THRESHOLD) -> None:
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, threshold)


def tune() -> None:
    limit_malloc_arenas()
    collect_oldest_less_often()


def malloc_trimmer() -> Callable[[], object] | None:
    """glibc's malloc_trim(0) (None without glibc): returns the free pages of every arena to the kernel."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


async def trim_periodically(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Give free heap pages back every ``interval_s``, in a worker thread (the event loop goes on)."""
    trim = malloc_trimmer()
    if trim is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        await asyncio.to_thread(trim)
        log.debug("malloc_trim: %.1f ms", (time.perf_counter() - started) * 1000)
