"""The reader on real files: row indices, selection, repeats, merges, bad lines."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gym_collect.errors import ConfigError, InputError
from gym_collect.nemo.routing import RowRouter
from gym_collect.nemo.rows import RequestBuilder
from gym_collect.reader import JsonlRows, RowSelection, count_rows, iter_requests, scan, shard_range
from tests.conftest import make_rows, write_rows


def builder(agent: str | None = "a", repeats: int = 1, rcp: dict | None = None) -> RequestBuilder:
    """Rows without `agent_ref` go to `agent`; rows with one keep theirs."""
    return RequestBuilder(RowRouter(agent_map=None, fan_out=None, unnamed_agent=agent),
                          lambda *keys: repeats, rcp or {})


def requests(path: Path, selection: RowSelection | None = None, repeats: int = 1, agent: str | None = "a",
             rcp: dict | None = None, done=lambda t, r: False) -> list:
    rows = JsonlRows(path, selection or RowSelection())
    return list(iter_requests(rows, builder(agent, repeats, rcp), done))


def test_row_index_counts_non_blank_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"q": 0}\r\n\r\n   \n{"q": 1}\n\n{"q": 2}')
    rows = list(JsonlRows(path, RowSelection()))
    assert [(r.index, r.line_no, r.data) for r in rows] == [
        (0, 1, {"q": 0}), (1, 4, {"q": 1}), (2, 6, {"q": 2})]
    assert count_rows(path) == 3


def test_selection_range_then_limit(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "in.jsonl", make_rows(20))
    got = requests(path, RowSelection(start_idx=5, end_idx=15, limit=4))
    assert [r.task_index for r in got] == [5, 6, 7, 8]
    assert [r.task_index for r in requests(path, RowSelection(start_idx=18))] == [18, 19]
    assert requests(path, RowSelection(start_idx=3, end_idx=3)) == []


def test_repeats_in_aabbcc_pattern_with_indices_in_body(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "in.jsonl", make_rows(3))
    got = requests(path, repeats=2)
    assert [(r.task_index, r.rollout_index) for r in got] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r.seq for r in got] == list(range(6))
    body = orjson.loads(got[3].body)
    assert (body["_ng_task_index"], body["_ng_rollout_index"]) == (1, 1)
    assert body["agent_ref"] == {"name": "a"}


def test_responses_create_params_shallow_merge_and_own_agent_ref(tmp_path: Path) -> None:
    rows = [{"responses_create_params": {"input": "hi", "temperature": 1.0},
             "agent_ref": {"type": "t", "name": "mine"}},
            {"responses_create_params": {"input": "yo", "max_output_tokens": 5}}]
    path = write_rows(tmp_path / "in.jsonl", rows)
    got = requests(path, rcp={"temperature": 0.2, "top_p": 0.9})
    first, second = (orjson.loads(r.body) for r in got)
    assert first["responses_create_params"] == {"input": "hi", "temperature": 0.2, "top_p": 0.9}
    assert first["agent_ref"] == {"type": "t", "name": "mine"} and got[0].agent_name == "mine"
    assert second["responses_create_params"] == {"input": "yo", "max_output_tokens": 5, "temperature": 0.2,
                                                 "top_p": 0.9}
    assert got[1].agent_name == "a"


def test_done_pairs_are_skipped_and_seq_stays_dense(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "in.jsonl", make_rows(3))
    got = requests(path, repeats=2, done=lambda t, r: (t + r) % 2 == 0)
    assert [(r.task_index, r.rollout_index, r.seq) for r in got] == [(0, 1, 0), (1, 0, 1), (2, 1, 2)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [(b'{"a": ', "not valid JSON"), (b"[1, 2]", "not a JSON object (a list)"), (b'{"a": "\xff"}', "not valid UTF-8")],
)
def test_bad_line_is_reported_with_file_and_line(tmp_path: Path, line: bytes, reason: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"ok": 1}\n\n' + line + b"\n")
    with pytest.raises(InputError, match=rf"in\.jsonl:3: {re.escape(reason)}.*on_bad_row=skip"):
        scan(JsonlRows(path, RowSelection()), builder(), "fail")
    found = scan(JsonlRows(path, RowSelection()), builder(), "skip")
    assert (found.num_rows, found.bad_rows) == (2, 1)
    bad = requests(path)[1]
    assert bad.error is not None and bad.error.startswith(f"{path}:3: ") and bad.body == b""


def test_bad_line_outside_selection_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"ok": 1}\nnot json\n')
    assert scan(JsonlRows(path, RowSelection(end_idx=1)), builder(), "fail").num_rows == 1


def test_missing_input_and_missing_agent(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input file not found"):
        scan(JsonlRows(tmp_path / "nope.jsonl", RowSelection()), builder(), "fail")
    path = write_rows(tmp_path / "in.jsonl", make_rows(1))
    with pytest.raises(ConfigError, match=r"in\.jsonl:1: the row has no agent_ref.name and no task_source"):
        scan(JsonlRows(path, RowSelection()), builder(agent=None), "fail")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 64))
def test_shards_cover_every_row_once_and_balanced(num_rows: int, num_shards: int) -> None:
    ranges = [shard_range(num_rows, num_shards, k) for k in range(num_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(
    st.text(max_size=5), st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.none()), max_size=4),
    max_size=20))
def test_any_row_survives_read(tmp_path_factory: pytest.TempPathFactory, rows: list[dict]) -> None:
    path = write_rows(tmp_path_factory.mktemp("rows") / "in.jsonl", rows)
    got = list(JsonlRows(path, RowSelection()))
    assert [r.data for r in got] == rows


# Rows are sent only as the check pass saw them --------------------------------------------------------------

LINE = st.one_of(st.just(b"\n"), st.just(b"  \r\n"), st.integers(0, 10**6).map(lambda i: b'{"q": %d}\n' % i),
                 st.integers(0, 10**6).map(lambda i: b'{"pad": "%s"}\r\n' % (b"x" * (i % 90))))


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import gym_collect.reader

    monkeypatch.setattr(gym_collect.reader, "BLOCK_LINES", 3)
    monkeypatch.setattr(gym_collect.reader, "BLOCK_BYTES", 60)


def checked(path: Path, selection: RowSelection) -> JsonlRows:
    """The rows a run dispatches after its check pass over `selection` (as `collect` builds them)."""
    found = scan(JsonlRows(path, selection), builder(), "skip")
    assert found.snapshot is not None
    start = selection.start_idx
    return JsonlRows(path, RowSelection(start, start + found.num_rows), expected=found.snapshot)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=40), bom=st.booleans(), start=st.integers(0, 12),
       stop=st.one_of(st.none(), st.integers(0, 40)))
def test_an_unchanged_file_passes_every_block_check(tmp_path_factory: pytest.TempPathFactory, small_blocks: None,
                                                    lines: list[bytes], bom: bool, start: int,
                                                    stop: int | None) -> None:
    path = tmp_path_factory.mktemp("blocks") / "in.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"".join(lines))
    selection = RowSelection(start, None if stop is None else max(start, stop))
    try:
        rows = checked(path, selection)
    except InputError:
        return  # an empty selection is refused before any block is checked
    assert [r.index for r in rows] == [r.index for r in JsonlRows(path, selection)]
    assert rows.change is None


@pytest.mark.parametrize("edit", ["same_size_same_mtime", "truncate_mid_line", "append"])
def test_a_row_changed_after_the_check_pass_is_never_given(tmp_path: Path, small_blocks: None, edit: str) -> None:
    path = write_rows(tmp_path / "in.jsonl", [{"q": f"q{i:03d}"} for i in range(30)])
    rows = checked(path, RowSelection())
    original = path.read_bytes()
    info = path.stat()
    if edit == "same_size_same_mtime":
        path.write_bytes(original.replace(b"q017", b"Q017"))
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    elif edit == "truncate_mid_line":
        path.write_bytes(original[: original.index(b"q017") + 2])
    else:
        path.write_bytes(original + b'{"q": "late"}\n')
    given = [r.data for r in rows]
    assert all(d is not None and d["q"].startswith("q") for d in given)  # only rows as they were checked
    assert len(given) < (17 if edit != "append" else 31) and rows.change is not None
