"""The external merge sort: equal to `sorted` (stable) whether or not it spills, files removed afterwards."""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.external_sort import ExternalSorter

Item = tuple[int, int, bytes]
items_strategy = st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 3), st.binary(max_size=8)), max_size=200)


@settings(max_examples=150, deadline=None)
@given(items=items_strategy, max_buffer=st.integers(1, 40), fan_in=st.integers(2, 5))
def test_equals_sorted_and_is_stable(items: list[Item], max_buffer: int, fan_in: int, tmp_path_factory:
                                     pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("sort")
    with ExternalSorter[Item](itemgetter(0, 1), max_buffer=max_buffer, fan_in=fan_in, folder=folder) as sorter:
        sorter.extend(items)
        got = list(sorter.sorted())
    # The key leaves the payload out, so equal keys with different payloads check stability.
    assert got == sorted(items, key=itemgetter(0, 1))
    assert list(folder.iterdir()) == []


def test_spills_runs_bounded_by_size_and_merges_them(tmp_path: Path) -> None:
    items = [(i * 7919 % 1000, b"x" * 100) for i in range(1000)]
    with ExternalSorter[tuple[int, bytes]](itemgetter(0), max_buffer=10_000, size=lambda it: len(it[1]),
                                           fan_in=4, folder=tmp_path) as sorter:
        sorter.extend(items)
        assert sorter.spilled_runs == 10  # 100 items of 100 bytes fill a buffer of 10 000
        assert len(list(next(tmp_path.iterdir()).iterdir())) == 10
        got = list(sorter.sorted())
        assert sorter.spilled_runs > 10  # more runs than fan_in: merged in passes first
    assert got == sorted(items, key=itemgetter(0))
    assert list(tmp_path.iterdir()) == []


def test_in_memory_when_the_buffer_is_never_full(tmp_path: Path) -> None:
    with ExternalSorter[int](lambda x: -x, max_buffer=100, folder=tmp_path) as sorter:
        sorter.extend([3, 1, 2])
        assert list(sorter.sorted()) == [3, 2, 1]
        assert sorter.spilled_runs == 0
    assert list(tmp_path.iterdir()) == []


def test_misuse_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_buffer"):
        ExternalSorter[int](int, max_buffer=0)
    with ExternalSorter[int](int, max_buffer=2, folder=tmp_path) as sorter:
        sorter.add(1)
        assert list(sorter.sorted()) == [1]
        with pytest.raises(ValueError, match="after sorted"):
            sorter.add(2)
        with pytest.raises(ValueError, match="twice"):
            list(sorter.sorted())
