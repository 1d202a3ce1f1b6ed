"""The registry's reads and upserts of many rows use few statement texts (SQLite keeps each one it
prepared): IN lists padded to a power of two, multi-row inserts in power-of-two runs."""

from __future__ import annotations

import pytest

from control_plane.registry.store import IN_LIST_MAX, in_list_chunks, power_of_two_slices


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 64, 100, 255, 256, 257, 600, 1000])
def test_in_lists_keep_every_name_in_few_lengths(count: int) -> None:
    names = [f"n{i}" for i in range(count)]
    chunks = in_list_chunks(names)
    assert [name for chunk in chunks for name in dict.fromkeys(chunk)] == names  # each once, in order
    for chunk in chunks:
        assert len(chunk) <= IN_LIST_MAX and len(chunk) & (len(chunk) - 1) == 0  # a power of two
        assert set(chunk[len(dict.fromkeys(chunk)) :]) <= {chunk[-1]}  # padding repeats the last name


def test_in_list_lengths_over_every_batch_size_are_few() -> None:
    lengths = {len(chunk) for count in range(1, 1001) for chunk in in_list_chunks(["x"] * count)}
    assert lengths == {2**k for k in range(9)}


@pytest.mark.parametrize("count", [0, 1, 5, 100, 256, 257, 600])
def test_row_runs_cover_the_rows_once(count: int) -> None:
    runs = power_of_two_slices(count, 256)
    covered = [i for run in runs for i in range(count)[run]]
    assert covered == list(range(count))
    assert all(0 < run.stop - run.start <= 256 for run in runs)
    assert all((run.stop - run.start) & (run.stop - run.start - 1) == 0 for run in runs)
    assert len({run.stop - run.start for c in range(1, 1001) for run in power_of_two_slices(c, 256)}) == 9
