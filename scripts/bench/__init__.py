"""The benchmark harness of issue 5: `scripts/bench.sh [--quick]` or `python -m scripts.bench [--quick]`."""
