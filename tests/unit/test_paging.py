"""Paged listings (control_plane.api.paging): limits, cursors, filters. Pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.api import paging
from control_plane.errors import InvalidInput
from control_plane.registry.models import HealthStatus, InstanceConfig, InstanceState, OperatorStatus


def walk(items: list[str], limit: int) -> list[list[str]]:
    pages, page = [], paging.Page(limit)
    while True:
        chosen, cursor = paging.take(items, lambda x: x, page)
        pages.append(chosen)
        if cursor is None:
            return pages
        page = paging.Page(limit, paging.decode_cursor(cursor))


@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=60), st.integers(1, 25))
def test_pages_cover_every_item_once_in_order(names: list[str], limit: int) -> None:
    items = sorted(names)
    pages = walk(items, limit)
    assert [x for page in pages for x in page] == items
    assert all(len(page) == limit for page in pages[:-1]) and len(pages[-1]) <= limit
    assert len(pages) == max(1, -(-len(items) // limit))


@given(st.text(min_size=1, max_size=80))
def test_cursors_round_trip(key: str) -> None:
    assert paging.decode_cursor(paging.encode_cursor(key)) == key


def test_items_added_or_removed_between_pages_skip_nothing_else() -> None:
    items = [f"i{n:02d}" for n in range(10)]
    first, cursor = paging.take(items, lambda x: x, paging.Page(4))
    assert first == ["i00", "i01", "i02", "i03"] and cursor is not None
    changed = [x for x in items if x != "i04"] + ["i035"]  # one removed after the cursor, one added
    rest, _ = paging.take(sorted(changed), lambda x: x, paging.Page(100, paging.decode_cursor(cursor)))
    assert rest == ["i035", "i05", "i06", "i07", "i08", "i09"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"cursor": ""}, "cursor"),
        ({"cursor": "x" * 401}, "cursor"),
    ],
)
def test_bad_page_parameters_name_the_field(query: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        paging.page_of(query)
    assert [e["field"] for e in caught.value.errors] == [field]


def test_page_defaults_keep_a_small_registry_in_one_answer() -> None:
    assert paging.page_of({}) == paging.Page(1000, None)
    assert paging.page_of({"limit": "1000", "cursor": paging.encode_cursor("a")}) == paging.Page(1000, "a")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"provider": "openai-ish"}, "provider"),
        ({"status": "broken"}, "status"),
        ({"model": ""}, "model"),
        ({"tag": "t" * 257}, "tag"),
    ],
)
def test_bad_filters_name_the_field(query: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        paging.instance_filter(query)
    assert [e["field"] for e in caught.value.errors] == [field]


def test_filters_all_must_hold() -> None:
    config = InstanceConfig(
        name="a",
        provider_type="ollama",
        supported_models=["llama3"],
        model_deployments={},
        tags=["rack-1"],
    )
    state = InstanceState(status=OperatorStatus.DRAINING, health_status=HealthStatus.HEALTHY)
    assert paging.InstanceFilter().matches(config, state)
    assert paging.instance_filter(
        {"model": "llama3", "provider": "ollama", "status": "draining", "tag": "rack-1"}
    ).matches(config, state)
    assert paging.instance_filter({"status": "healthy"}).matches(config, state)
    for query in ({"model": "other"}, {"provider": "openai"}, {"status": "active"}, {"tag": "rack-2"}):
        assert not paging.instance_filter(query).matches(config, state), query
