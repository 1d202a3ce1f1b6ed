"""What every stage of a benchmark run shares: the run's profile (full / quick), its time budget, the
log line, and the constants of the clients."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

DUMMY_KEY = "sk-bench-client-0123456789"
SYSLOG_DROP = "send() to syslog failed"  # nginx could not hand a log line to the controller
NOISE_CORES = 0.25  # CPU taken by processes outside the benchmark above which a measurement is repeated
T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    mode: str
    warmup_s: float
    duration_s: float
    latency_s: float
    stream_samples: int
    static_s: float
    storm_s: float
    kill_s: float
    live_changes: int
    scale_reps: int
    sizes: tuple[tuple[int, int], ...]
    budget_s: float
    probe_window_s: float  # at least one probe interval (10 s by default)


SIZES = ((10, 10), (100, 50), (1000, 200))
LARGE = (10_000, 1_000)  # issue 17: the full run only, medians of 5
FULL = Profile("full", 2, 10, 10, 100, 6, 15, 12, 50, 5, (*SIZES, LARGE), 1020, 20)
QUICK = Profile("quick", 1, 2, 2, 15, 2, 4, 4, 10, 1, SIZES, 170, 10)
LITELLM_WARMUP_S = 6  # its first requests import modules lazily


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def log(message: str) -> None:
    print(f"{datetime.now().strftime('%H:%M:%S')} [bench] {message}", file=sys.stderr, flush=True)
