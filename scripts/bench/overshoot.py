"""How far over a key's tpm_limit a burst goes (issue 12). nginx learns a request's tokens only once its
answer has ended (gw.limits counts in the log phase), so requests that arrive while others are still being
answered all pass the check: a burst of N concurrent requests against a nearly spent limit can go over it
by up to N requests' tokens. This measures it against the real gateway (controller + nginx on loopback,
a stand-in backend that takes `--delay-ms` to answer, as a model does).

For each concurrency N: a fresh key with tpm_limit L; sequential requests while one more fits under L
(the key is then "nearly spent"); then N requests at once. Reported: how many of the N passed and the
tokens spent over L.

    .venv/bin/python -m scripts.bench.overshoot [--limit 1000] [--concurrency 1,4,16,64] [--delay-ms 300]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import tempfile
import threading
from pathlib import Path

import httpx

from tests.backends.stub_llm import StubServer
from tests.integration.gateway import Gateway

PROMPT = [{"role": "user", "content": "x" * 1200}]  # ~300 prompt tokens + 10 completion tokens


REFUSALS: list[str] = []


def _chat(gw: Gateway, secret: str, client: httpx.Client) -> tuple[int, int]:
    answer = client.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "m", "messages": PROMPT},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )
    tokens = answer.json()["usage"]["total_tokens"] if answer.status_code == 200 else 0
    if answer.status_code != 200:
        REFUSALS.append(f"{answer.status_code} {answer.text[:200]}")
    return answer.status_code, tokens


def burst(gw: Gateway, limit: int, n: int) -> dict[str, int]:
    created = gw.admin.post("/admin/keys", json={"name": f"burst-{n}", "tpm_limit": limit})
    created.raise_for_status()
    secret = created.json()["key"]
    gw.wait_applied()
    # One client (its connection pool sized for the burst): making an httpx client per request costs
    # tens of milliseconds of CPU under the GIL (its TLS context), which would spread the burst out.
    client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=n + 1))
    spent, size = 0, 0
    while True:  # bounded: each request spends ~310 tokens of a finite limit
        status, tokens = _chat(gw, secret, client)
        if status != 200:
            raise RuntimeError(f"refused before the limit: {status}")
        spent, size = spent + tokens, tokens
        if spent + size >= limit:
            break
    start = threading.Barrier(n)

    def together(_: int) -> tuple[int, int]:
        start.wait(timeout=30)
        return _chat(gw, secret, client)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(together, range(n)))
    finally:
        client.close()
    passed = [tokens for status, tokens in results if status == 200]
    refused = sum(1 for status, _ in results if status == 429)
    total = spent + sum(passed)
    return {
        "concurrency": n,
        "spent_before": spent,
        "passed": len(passed),
        "refused": refused,
        "total": total,
        "over_limit": max(0, total - limit),
        "request_tokens": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--delay-ms", type=int, default=300)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ishgw-overshoot-", dir="/tmp"))
    stub = StubServer("overshoot").start()
    httpx.post(f"{stub.url}/_control", json={"mode": "slow", "delay_ms": args.delay_ms}).raise_for_status()
    env = {
        "ISHGW_AUTH_REQUIRED": "true",
        "ISHGW_USAGE_ACCOUNTING": "true",
        "ISHGW_LIMIT_CONN_PER_KEY": "0",
        "ISHGW_PROBES_ENABLED": "false",
    }
    try:
        with Gateway(extra_env=env, home=home) as gw:
            added = gw.add_instance(
                name="stub", provider_type="ollama", api_base=stub.url, supported_models=["m"]
            )
            added.raise_for_status()
            print(f"tpm_limit {args.limit}, answers after {args.delay_ms} ms", flush=True)
            print("concurrency  passed  refused  tokens  over the limit  (one request: tokens)", flush=True)
            for n in (int(x) for x in args.concurrency.split(",")):
                r = burst(gw, args.limit, n)
                print(
                    f"{r['concurrency']:>11}  {r['passed']:>6}  {r['refused']:>7}  {r['total']:>6}  "
                    f"{r['over_limit']:>14}  ({r['request_tokens']})",
                    flush=True,
                )
                for text in sorted(set(REFUSALS)):
                    print(f"             refused: {text}", flush=True)
                REFUSALS.clear()
    finally:
        stub.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
