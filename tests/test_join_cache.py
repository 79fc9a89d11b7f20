"""The join cache grows by segments after each write and reads the same values as one built afresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from caselens.indexes import join_cache
from caselens.indexes.collection import Collection
from caselens.indexes.join_cache import JoinCache
from caselens.indexes.reader import reader_of


def _table(start: int, stop: int, deleted: set[int] = frozenset()) -> pa.Table:
    rows = [r for r in range(start, stop) if r not in deleted]
    return pa.table({
        "_row": pa.array(rows, pa.int64()),
        "id": pa.array([f"i{r}" for r in rows]),
        "kind": pa.array(["image" if r % 3 else "text" for r in rows]),
        "score": pa.array([None if r % 7 == 0 else r / 2 for r in rows], pa.float64()),
        "note": pa.array([None] * len(rows), pa.string()),  # never a value: not read
        "late": pa.array([f"v{r}" if r >= 500 else None for r in rows], pa.string()),
    })


def _same(cache: JoinCache, fresh: JoinCache, top: int) -> None:
    asked = list(range(-2, top + 3))
    assert cache.names == fresh.names
    assert cache.values(asked) == fresh.values(asked)  # read from the buffers, row by row (many rows: Arrow)
    for r in asked[::37]:
        assert cache.values([r]) == fresh.values([r])


@pytest.mark.parametrize("python_below", [32, 0])
def test_extended_caches_read_what_a_fresh_build_reads(monkeypatch: pytest.MonkeyPatch, python_below: int) -> None:
    monkeypatch.setattr(JoinCache, "PYTHON_BELOW", python_below)
    cache = JoinCache.build(_table(0, 400))
    deleted: set[int] = set()
    top = 400
    rng = np.random.default_rng(0)
    for step in range(12):
        add = int(rng.integers(0, 60))
        gone = set(rng.choice(top, 5, replace=False).tolist()) if step % 3 == 1 else set()
        deleted |= gone
        now = np.asarray([r for r in range(top + add) if r not in deleted], np.int64)
        cache = cache.extend(_table(top, top + add, deleted), now)
        top += add
        _same(cache, JoinCache.build(_table(0, top, deleted)), top)
        assert cache.live == len(now)
        assert len(cache.segments) <= 1 + int(np.log2(max(2, top)))  # merged as they pile up


def test_a_snapshot_after_a_write_reads_only_the_rows_added(home: Path) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(60, 8)).astype(np.float32)
    record = {"spec": "test:vectors", "dim": 8, "modalities": ["image"], "fingerprint": "f" * 16, "options": {}}
    coll = Collection.create("jc", record, home)
    coll.add([{"id": f"v{i}", "kind": "image", "source": f"s{i}", "metadata": {"group": f"g{i % 3}"}}
              for i in range(50)], vecs[:50])
    reader = reader_of(coll)
    first = reader.snapshot()
    coll.add([{"id": f"n{i}", "kind": "text", "source": "n", "text": f"t{i}", "metadata": {"group": "new"}}
              for i in range(5)], vecs[50:55])
    second = reader.snapshot()
    assert second.join_cache.segments[0] is first.join_cache.segments[0]  # shared, not rebuilt
    assert second.join_cache.segments[-1].num_rows == 5
    coll.delete(["v3", "n1"])
    third = reader.snapshot()
    assert third.row_dicts([3, 51]) == {} and first.row_dicts([3])[3]["id"] == "v3"  # old snapshots unchanged
    fresh = reader_of(Collection.open("jc", home)).snapshot()
    assert fresh.join_cache is not third.join_cache and len(fresh.join_cache.segments) == 1
    every = list(range(-1, 60))
    assert third.values(every) == fresh.values(every)
    assert third.texts()[0].tolist() == fresh.texts()[0].tolist() == [50, 52, 53, 54]
    assert third.row_of("n4") == fresh.row_of("n4") == 54 and third.row_of("v3") is None
    assert third.data.to_pylist() == fresh.data.to_pylist()


def test_a_cache_that_is_mostly_deleted_rows_is_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = JoinCache.build(_table(0, 100))
    now = np.arange(60, 110, dtype=np.int64)  # 60 of 100 deleted, 10 added
    later = cache.extend(_table(100, 110), now)
    assert len(later.segments) == 1 and later.held == later.live == 50
    _same(later, JoinCache.build(_table(60, 110)), 110)
    monkeypatch.setattr(join_cache, "DEAD_SHARE", 1.0)
    kept = cache.extend(_table(100, 110), now)
    assert kept.held == 110 and kept.live == 50
    _same(kept, later, 110)


def test_rows_read_as_lines_equal_rows_read_column_by_column(monkeypatch: pytest.MonkeyPatch) -> None:
    import math

    numbers = [0.0, -0.0, float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308, 0.1, 1 / 3, None, float("nan")]
    n = len(numbers)
    table = pa.table({
        "_row": pa.array(range(n), pa.int64()),
        "id": pa.array([f"ü{i}" if i % 3 else "" for i in range(n)]),
        "kind": pa.array(["image"] * n),
        "score": pa.array(numbers, pa.float64()),
        "count": pa.array([None if i == 4 else (-1) ** i * 2**62 + i for i in range(n)], pa.int64()),
        "note": pa.array([None, "a\x00b", "𝄞", "\x1e", "x", None, "", "y", "z", "w"]),
    })
    lines = JoinCache.build(table)
    assert lines.segments[0].lines is not None
    asked = list(range(-1, n + 1))
    by_lines = lines.values(asked)
    monkeypatch.setattr(join_cache.Segment, "__init__", _without_lines(join_cache.Segment.__init__))
    by_columns = JoinCache.build(table).values(asked)
    monkeypatch.setattr(JoinCache, "PYTHON_BELOW", 0)
    by_arrow = JoinCache.build(table).values(asked)

    def same(a: list | None, b: list | None) -> bool:
        if a is None or b is None:
            return a is b
        return all((isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
                   or (x == y and type(x) is type(y) and (not isinstance(x, float) or math.copysign(1, x) == math.copysign(1, y)))
                   for x, y in zip(a, b, strict=True))

    assert all(same(a, b) and same(a, c) for a, b, c in zip(by_lines, by_columns, by_arrow, strict=True))


def _without_lines(init):  # noqa: ANN001, ANN202
    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        init(self, *args, **kwargs)
        self.lines = None
    return wrapped


@pytest.mark.parametrize("value", ["has \x1f inside", "\x00"])
def test_strings_that_would_break_a_line_are_read_column_by_column(value: str) -> None:
    table = pa.table({"_row": pa.array([0, 1], pa.int64()), "id": pa.array(["a", value])})
    cache = JoinCache.build(table)
    assert cache.segments[0].lines is None
    assert cache.values([1, 0]) == [[1, value], [0, "a"]]
