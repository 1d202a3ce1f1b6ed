"""The static-backend ratio of the benchmark: plain nginx and the gateway measured in turn, the median of the
pairs' ratios (scripts.bench.dataplane), and how the report states it."""

from __future__ import annotations

from typing import Any

from scripts.bench import counting, report
from scripts.bench.dataplane import pair_ratio, table_pairs


def test_median_of_pair_ratios_not_ratio_of_medians() -> None:
    # A fast plain run paired with a fast gateway run: the pairing keeps the swing out of the ratio.
    pairs = [(20_000.0, 11_000.0), (33_000.0, 17_000.0), (22_000.0, 10_000.0)]
    assert pair_ratio(pairs) == (0.515, [0.455, 0.515, 0.55])


def test_even_count_and_empty() -> None:
    assert pair_ratio([(10.0, 5.0), (10.0, 6.0)]) == (0.55, [0.5, 0.6])
    assert pair_ratio([]) == (None, [])
    assert pair_ratio([(0.0, 5.0)]) == (None, [])


def _static(ratios: list[float]) -> dict[str, object]:
    row = {"label": "x", "requests": 1, "rps": 1.0, "failed": 0, "p50_ms": 0.1, "cpu_cores": 1.0}
    return {"rows": [row, row, row], "ratio": 0.515, "pair_ratios": ratios}


def test_report_names_the_pairs() -> None:
    text = report.markdown({"static_backend": _static([0.455, 0.515, 0.55])})
    assert "static backend: 0.515x (median of 3 pairs run in turn: 0.455x, 0.515x, 0.550x" in text
    single = report.markdown({"static_backend": _static([0.515])})
    assert "static backend: 0.515x." in single


def test_stand_in_targets_take_the_median_of_the_pairs() -> None:
    table = {
        "data_plane": {"nginx": {"rps": {"16": {"rps": 100.0}}}, "gateway": {"rps": {"16": {"rps": 80.0}}}}
    }
    assert report.standin_ratio(table, "16") == 0.8
    assert report.standin_sentence(table) == []
    paired = {**table, "standin_pairs": {"16": {"ratio": 0.86, "pair_ratios": [0.8, 0.86, 0.9]}}}
    assert report.standin_ratio(paired, "16") == 0.86
    (row,) = [r for r in report.evaluate_targets(paired) if r["name"].endswith("c16, TLS off")]
    assert row["met"] is True
    assert "c16 0.860x (median of 3 pairs run in turn: 0.800x, 0.860x, 0.900x" in report.markdown(paired)


def test_the_litellm_ratio_takes_the_gateways_median_run_of_the_pairs() -> None:
    dp = {"gateway": {"rps": {"16": {"rps": 4000.0}}}, "litellm": {"rps": {"16": {"rps": 100.0}}}}
    table = {"data_plane": dp}

    def litellm_row(results: dict[str, Any]) -> dict[str, Any]:
        (row,) = [
            r for r in report.evaluate_targets(results) if r["name"] == "gateway rps / LiteLLM rps, c16"
        ]
        return row

    assert litellm_row(table)["value"] == 40.0  # the table's run alone
    assert litellm_row(table)["met"] is False
    # the table's run is the first pair's, here the slowest of three
    paired = {
        **table,
        "standin_pairs": {
            "16": {"ratio": 0.86, "pair_ratios": [0.8, 0.86, 0.9], "gateway_rps": [4000.0, 5500.0, 6000.0]}
        },
    }
    assert report.gateway_rps(paired, "16") == 5500.0
    two = {"standin_pairs": {"16": {"gateway_rps": [4000.0, 5000.0]}}}  # one pair failed: the two averaged
    assert report.gateway_rps(two, "16") == 4500.0
    assert litellm_row(paired)["value"] == 55.0
    assert litellm_row(paired)["met"] is True
    assert "The gateway / LiteLLM ratios take the gateway's median run of these pairs." in report.markdown(
        paired
    )
    # results of an older run, without the gateway's runs: the table's
    older = {**table, "standin_pairs": {"16": {"ratio": 0.86, "pair_ratios": [0.8, 0.86, 0.9]}}}
    assert litellm_row(older)["value"] == 40.0


def test_counting_cost_is_the_median_of_the_pairs_on_off_ratios_and_the_report_says_how() -> None:
    # pair order: the on and off runs of pair n at index n
    found = counting.cost([900.0, 1000.0, 1100.0], [1000.0, 1000.0, 1000.0])
    assert found == {"ratio": 1.0, "pair_ratios": [0.9, 1.0, 1.1], "on_rps": 1000.0, "off_rps": 1000.0}
    assert report.counting_sentence({}) is None
    results = {"counting_cost": {"concurrency": 64, "seconds": 6, "kinds": {"static": found}}}
    sentence = report.counting_sentence(results)
    assert sentence is not None
    assert "pairs run in turn at c64, 6 s each" in sentence
    assert "against the static backend 1.000x (median of 3 pairs: 0.900x, 1.000x, 1.100x;" in sentence
    assert "against the stand-in" not in sentence  # not measured: not said
    assert sentence in report.markdown(results)
    assert sentence in report.readme_block(results)
    one = {
        "counting_cost": {
            "concurrency": 64,
            "seconds": 2,
            "kinds": {"standin": counting.cost([95.0], [100.0])},
        }
    }
    assert "against the stand-in 0.950x (one pair; requests/s 95 with counting, 100 without)" in str(
        report.counting_sentence(one)
    )


def test_the_tables_stand_in_runs_are_the_first_pair_unless_one_failed_requests() -> None:
    def runs(rps: float, failed: int) -> dict[str, Any]:
        return {"rps": {"16": {"rps": rps, "failed": failed}, "64": {"rps": rps, "failed": 0}}}

    pairs, tabled, failed = table_pairs({"nginx": runs(100.0, 0), "gateway": runs(80.0, 0)})
    assert (pairs, tabled, failed) == ({"16": [(100.0, 80.0)], "64": [(100.0, 80.0)]}, True, [])
    pairs, tabled, failed = table_pairs({"nginx": runs(100.0, 0), "gateway": runs(120.0, 7)})
    assert (pairs, tabled, failed) == ({"16": [], "64": [(100.0, 120.0)]}, True, ["16"])
    pairs, tabled, failed = table_pairs({"nginx": runs(100.0, 0)})  # the gateway not measured
    assert (pairs, tabled, failed) == ({"16": [], "64": []}, False, [])
