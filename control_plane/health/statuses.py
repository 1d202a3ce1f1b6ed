"""What an instance's HTTP status says about the instance: the one table that probes, the tracker, the
routing measurements and the autoscaler read. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

# The instance refused the gateway's credential: quarantined until its configuration changes.
CREDENTIAL_STATUSES = frozenset({401, 402, 403})
# The instance is rate limited (its Retry-After says for how long).
RATE_LIMITED_STATUSES = frozenset({429})
# Answers that mean "no such endpoint here", not "down" (read by probes only: traffic on a path the
# instance does not serve is the client's mistake).
UNSUPPORTED_STATUSES = frozenset({404, 405, 501})
# At or above this, or no answer at all, the instance failed.
FAILURE_FROM = 500


class Verdict(StrEnum):
    OK = "ok"
    FAILURE = "failure"
    RATE_LIMITED = "rate_limited"
    CREDENTIAL = "credential"


def classify(status: int | None) -> Verdict:
    """What one upstream answer (None: none came) says about the instance, never the client's mistakes."""
    verdict = _VERDICTS.get(status)
    return _classify(status) if verdict is None else verdict


def _classify(status: int | None) -> Verdict:
    if status is None or status >= FAILURE_FROM:
        return Verdict.FAILURE
    if status in RATE_LIMITED_STATUSES:
        return Verdict.RATE_LIMITED
    if status in CREDENTIAL_STATUSES:
        return Verdict.CREDENTIAL
    return Verdict.OK


# Every status nginx can log, and no answer: one lookup per attempt on the log stream's path.
_VERDICTS: Mapping[int | None, Verdict] = {status: _classify(status) for status in (None, *range(1000))}
