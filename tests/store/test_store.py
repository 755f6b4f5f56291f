"""The run store: exact round trips, errors at the boundary, crash safety, live reading."""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.store.helpers import APPEND_SCRIPT, TRAIN_SCRIPT, Child
from trainprobe.store import Record, Run, RunError, RunWriter

#: Scalars that must come back bit for bit (NaN travels as SQL NULL).
SCALARS = [1.5, float("nan"), float("inf"), -float("inf"), -0.0, 1e-300, 2.0**53 + 2, -7.25]

#: Arrays of several dtypes and shapes, including an empty one and a big-endian one.
ARRAYS = {
    "float32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    "float64": np.array([np.nan, np.inf, -np.inf, 0.1, -0.0]),
    "int64": np.arange(-12, 12, dtype=np.int64).reshape(2, 3, 4),
    "bool": np.array([[True, False], [False, True], [True, True]]),
    "int64_big": np.iinfo(np.int64).max - np.arange(3, dtype=np.int64),
    "float64_be": np.arange(4, dtype=">f8"),
    "float32_empty": np.zeros((0, 3), dtype=np.float32),
}


def write(run_dir: Path, records: list[Record], **meta: object) -> None:
    writer = RunWriter(run_dir)
    if meta:
        writer.set_meta(meta)
    writer.append(records)
    writer.close()


def stored_state(run_dir: Path) -> dict[str, tuple[list[int], list]]:
    """Every key's steps and values, for comparing a run before and after a failed write."""
    state = {}
    with Run(run_dir) as run:
        keys = run.keys()
        for key in keys:
            steps, arrays = run.arrays(key)
            if not arrays:  # a scalar key
                series = run.series(key)
                steps, arrays = series.steps, series.values
            state[key] = (steps.tolist(), [np.asarray(a).tolist() for a in arrays])
    return state


# -- round trips ----------------------------------------------------------------------------


def test_scalars_round_trip_exactly(tmp_path):
    records = [
        Record(step, {"scalars/loss": value, "scalars/step": step})
        for step, value in enumerate(SCALARS)
    ]
    records[3] = Record(3, {**records[3].values, "scalars/sparse": 0.25})
    records[6] = Record(6, {**records[6].values, "scalars/sparse": np.float32(3.5)})
    write(tmp_path / "r", records)

    with Run(tmp_path / "r") as run:
        loss = run.series("scalars/loss")
        assert loss.key == "scalars/loss"
        assert loss.steps.dtype == np.int64 and loss.values.dtype == np.float64
        np.testing.assert_array_equal(loss.steps, np.arange(len(SCALARS)))
        np.testing.assert_array_equal(loss.values, np.array(SCALARS))  # NaN == NaN here
        assert loss.values[6] == 2.0**53 + 2
        assert len(loss) == len(SCALARS)
        np.testing.assert_array_equal(run.series("scalars/step").values, np.arange(len(SCALARS)))
        sparse = run.series("scalars/sparse")
        assert sparse.steps.tolist() == [3, 6] and sparse.values.tolist() == [0.25, 3.5]


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_arrays_round_trip_with_dtype_and_shape(tmp_path, name):
    first = ARRAYS[name]
    written = [first, first[::-1].copy(), first.copy()]
    write(tmp_path / "r", [Record(10 * i, {f"arr/{name}": a}) for i, a in enumerate(written)])

    with Run(tmp_path / "r") as run:
        steps, arrays = run.arrays(f"arr/{name}")
        assert steps.tolist() == [0, 10, 20]
        for got, want in zip(arrays, written, strict=True):
            assert got.shape == want.shape
            assert got.dtype == want.dtype.newbyteorder("=")
            assert got.dtype.isnative and got.flags.writeable
            np.testing.assert_array_equal(got, want)
        series = run.series(f"arr/{name}")
        assert series.values.shape == (3, *first.shape)
        assert series.values.dtype == first.dtype.newbyteorder("=")
        np.testing.assert_array_equal(series.values, np.stack(written))


def test_array_key_whose_shape_changes(tmp_path):
    write(tmp_path / "r", [Record(0, {"h/x": np.zeros(3)}), Record(1, {"h/x": np.ones((2, 2))})])
    with Run(tmp_path / "r") as run:
        with pytest.raises(RunError, match=r"changes shape over steps.*\.arrays\(\)"):
            run.series("h/x")
        steps, arrays = run.arrays("h/x")
        assert steps.tolist() == [0, 1]
        np.testing.assert_array_equal(arrays[0], np.zeros(3))
        np.testing.assert_array_equal(arrays[1], np.ones((2, 2)))


def test_keys_layers_last_step_contains(tmp_path):
    write(
        tmp_path / "r",
        [
            Record(
                0,
                {
                    "norms/grad/b.weight": 1.0,
                    "norms/grad/a.weight": 2.0,
                    "norms/grad_total": 3.0,
                    "scalars/loss": 4.0,
                },
            ),
            Record(1, {"norms/grad/c.bias": 5.0, "activations/hist": np.zeros(2)}),
            Record(7, {"activations/hist": np.ones(2)}),  # the last step is an array-only step
        ],
    )
    with Run(tmp_path / "r") as run:
        assert run.keys() == [
            "norms/grad/b.weight",
            "norms/grad/a.weight",
            "norms/grad_total",
            "scalars/loss",
            "norms/grad/c.bias",
            "activations/hist",
        ]
        assert run.keys("norms/grad") == [
            "norms/grad/b.weight",
            "norms/grad/a.weight",
            "norms/grad_total",
            "norms/grad/c.bias",
        ]
        assert run.keys("norms/grad/") == [
            "norms/grad/b.weight",
            "norms/grad/a.weight",
            "norms/grad/c.bias",
        ]
        assert run.keys("nothing/") == []
        assert run.layers("norms/grad") == ["b.weight", "a.weight", "c.bias"]
        assert run.layers("norms/grad/") == run.layers("norms/grad")
        assert run.last_step() == 7
        assert "scalars/loss" in run and "scalars/los" not in run
        assert repr(run) == f"Run({str(tmp_path / 'r')!r})"


def test_empty_run(tmp_path):
    RunWriter(tmp_path / "r").close()
    with Run(tmp_path / "r") as run:
        assert run.keys() == [] and run.last_step() is None


def test_a_closed_run_is_one_file_and_stays_so_when_read(tmp_path):
    writer = RunWriter(tmp_path / "r")
    writer.append([Record(0, {"x": 1.0})])
    writer.close()
    with Run(tmp_path / "r") as run:
        assert run.series("x").values.tolist() == [1.0]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["run.db"]
    writer = RunWriter(tmp_path / "r", resume=True)  # WAL again while writing
    writer.append([Record(1, {"x": 2.0})])
    with Run(tmp_path / "r") as run:  # a live reader: the writer keeps WAL mode at close
        run.keys()  # hold a read snapshot open
        writer.close()
        assert run.series("x").values.tolist() == [1.0, 2.0]
        mode = sqlite3.connect(tmp_path / "r" / "run.db").execute("PRAGMA journal_mode")
        assert mode.fetchone()[0] == "wal"


def test_empty_run_to_pandas(tmp_path):
    pytest.importorskip("pandas")
    RunWriter(tmp_path / "r").close()
    with Run(tmp_path / "r") as run:
        assert run.to_pandas().empty


def test_to_pandas_without_pandas_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    RunWriter(tmp_path / "r").close()
    with Run(tmp_path / "r") as run, pytest.raises(ImportError, match=r"needs pandas: pip install"):
        run.to_pandas()


def test_meta_round_trips_as_json(tmp_path):
    meta = {"config": {"lr": 0.1, "layers": [16, 32], "name": "cnn", "flag": None}, "seed": 3}
    writer = RunWriter(tmp_path / "r")
    writer.set_meta(meta)
    writer.set_meta({"seed": 4})  # insert or replace per key
    writer.close()
    with Run(tmp_path / "r") as run:
        writer = run.meta.pop("writer")
        assert run.meta == {
            "format": "trainprobe-run",
            "schema_version": 1,
            "status": "finished",  # the writer's own: running while open, finished at close
            "config": meta["config"],
            "seed": 4,
        }
        assert writer["pid"] == os.getpid() and set(writer) == {"pid", "host", "started"}


def test_to_pandas_is_wide_over_scalar_keys(tmp_path):
    pd = pytest.importorskip("pandas")
    write(
        tmp_path / "r",
        [
            Record(0, {"scalars/loss": 2.0, "scalars/acc": 0.1, "norms/grad_total": 9.0}),
            Record(5, {"scalars/loss": float("nan"), "arr/x": np.zeros(3)}),
            Record(9, {"scalars/loss": float("inf"), "scalars/acc": 0.5}),
        ],
    )
    with Run(tmp_path / "r") as run:
        frame = run.to_pandas("scalars/")
        expected = pd.DataFrame(
            {"scalars/loss": [2.0, np.nan, np.inf], "scalars/acc": [0.1, np.nan, 0.5]},
            index=pd.Index(np.array([0, 5, 9], dtype=np.int64), name="step"),
        )
        pd.testing.assert_frame_equal(frame, expected)
        assert list(run.to_pandas().columns) == [
            "scalars/loss",
            "scalars/acc",
            "norms/grad_total",
        ]  # array keys left out


def test_resume_appends_past_the_last_step(tmp_path):
    write(tmp_path / "r", [Record(0, {"a": 1.0}), Record(1, {"a": 2.0})], user="x")
    writer = RunWriter(tmp_path / "r", resume=True)
    assert writer.last_step == 1
    with pytest.raises(ValueError, match="recorded twice for the same step"):
        writer.append([Record(1, {"a": 3.0})])
    writer.append([Record(2, {"a": 3.0, "b": np.arange(2)})])
    writer.close()
    with Run(tmp_path / "r") as run:
        assert run.series("a").values.tolist() == [1.0, 2.0, 3.0]
        assert run.arrays("b")[0].tolist() == [2]
        assert run.meta["user"] == "x"


# -- writing errors -------------------------------------------------------------------------


def _failed_write_leaves_nothing(tmp_path: Path, bad: list[Record], error: type, match: str):
    """``bad`` fails as ``error``; the run is unchanged and the writer still works."""
    writer = RunWriter(tmp_path / "r")
    writer.append([Record(0, {"s": 1.0, "arr": np.arange(3.0)}), Record(1, {"s": 2.0})])
    before = stored_state(tmp_path / "r")
    with pytest.raises(error, match=match):
        writer.append(bad)
    assert stored_state(tmp_path / "r") == before
    assert writer.last_step == 1
    # Still usable, also for the key the failed transaction introduced first, and for a
    # key new now (it must not collide with anything the failed transaction reserved).
    writer.append([Record(2, {"fresh": 7.0, "s": 3.0}), Record(3, {"later": 8.0, "fresh": 9.0})])
    writer.close()
    with Run(tmp_path / "r") as run:
        assert run.keys() == ["s", "arr", "fresh", "later"]
        assert run.series("fresh").steps.tolist() == [2, 3]
        assert run.series("fresh").values.tolist() == [7.0, 9.0]
        assert run.series("later").values.tolist() == [8.0]
        assert run.series("s").values.tolist() == [1.0, 2.0, 3.0]
        assert run.last_step() == 3


def test_duplicate_step_fails_atomically(tmp_path):
    bad = [Record(2, {"fresh": 1.0, "s": 5.0}), Record(1, {"s": 6.0})]  # (s, 1) exists
    _failed_write_leaves_nothing(tmp_path, bad, ValueError, "recorded twice for the same step")


def test_duplicate_step_within_one_append_fails_atomically(tmp_path):
    bad = [Record(2, {"fresh": 1.0}), Record(2, {"fresh": 2.0})]
    _failed_write_leaves_nothing(tmp_path, bad, ValueError, "recorded twice for the same step")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("s", np.zeros(2), "key 's' holds scalar values in this run but got a array"),
        ("arr", 1.0, "key 'arr' holds array values in this run but got a scalar"),
    ],
)
def test_key_switching_kind_fails_atomically(tmp_path, key, value, match):
    bad = [Record(2, {"fresh": 1.0}), Record(3, {"fresh": 2.0, key: value})]
    _failed_write_leaves_nothing(tmp_path, bad, ValueError, match)


@pytest.mark.parametrize(
    "value",
    [
        np.array(["a", "b"]),
        np.array([b"x"]),
        np.array([1 + 2j]),
        np.array([None, 1.0]),
    ],
)
def test_non_numeric_array_is_a_type_error(tmp_path, value):
    bad = [Record(2, {"fresh": 1.0, "bad": value})]
    _failed_write_leaves_nothing(tmp_path, bad, TypeError, "must be bool, integer or float")


def test_existing_run_needs_resume(tmp_path):
    write(tmp_path / "r", [Record(0, {"a": 1.0})])
    with pytest.raises(FileExistsError, match=r"already holds a run.*resume=True"):
        RunWriter(tmp_path / "r")
    with Run(tmp_path / "r") as run:
        assert run.series("a").values.tolist() == [1.0]


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no run.*drop resume=True"):
        RunWriter(tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing" / "run.db").exists()


# -- reading errors -------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Run(tmp_path / "nope")


def test_directory_without_db(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match=r"run\.db is missing"):
        Run(tmp_path / "r")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a database at all\n" * 300,
        bytes(random.Random(0).randrange(256) for _ in range(8192)),
    ],
)
def test_garbage_db_is_a_run_error(tmp_path, content):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.db").write_bytes(content)
    with pytest.raises(RunError, match="cannot be read as a trainprobe run"):
        Run(tmp_path / "r")


@pytest.mark.parametrize("fraction", [0.5, 0.2, 0.9])
def test_truncated_db_is_a_run_error(tmp_path, fraction):
    writer = RunWriter(tmp_path / "r")
    writer.append(Record(s, {"x": float(s), "arr": np.arange(300.0) + s}) for s in range(300))
    writer.close()
    db = tmp_path / "r" / "run.db"
    data = db.read_bytes()
    assert len(data) > 100_000 and not (tmp_path / "r" / "run.db-wal").exists()
    db.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(RunError, match="malformed"):  # at open, or at the first full read
        with Run(tmp_path / "r") as run:
            keys = run.keys()
            for key in keys:
                run.series(key)


def _sqlite(path: Path, *statements: str) -> Path:
    path.mkdir()
    conn = sqlite3.connect(path / "run.db")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize(
    ("statements", "match"),
    [
        (["CREATE TABLE t (a)"], "no such table: meta"),
        (
            ["CREATE TABLE meta (key, value)", "INSERT INTO meta VALUES ('format', '\"other\"')"],
            "not a trainprobe run",
        ),
        (
            ["CREATE TABLE meta (key, value)", "INSERT INTO meta VALUES ('version', '3.1 beta')"],
            "not a trainprobe run",
        ),
    ],
)
def test_foreign_sqlite_file_is_a_run_error(tmp_path, statements, match):
    with pytest.raises(RunError, match=match):
        Run(_sqlite(tmp_path / "r", *statements))


def test_unknown_key_lists_close_matches(tmp_path):
    write(
        tmp_path / "r",
        [Record(0, {"norms/grad_total": 1.0, "norms/weight_total": 2.0, "arr/x": np.zeros(2)})],
    )
    with Run(tmp_path / "r") as run:
        with pytest.raises(
            KeyError, match="no key 'norms/grad_totl'; did you mean norms/grad_total"
        ):
            run.series("norms/grad_totl")
        with pytest.raises(KeyError, match=r"no key 'zzz'; list them with run\.keys\(\)"):
            run.series("zzz")
        with pytest.raises(KeyError, match="did you mean arr/x"):
            run.arrays("arr/y")


# -- crash safety and live reading (real processes) -----------------------------------------


def _assert_contiguous_run(run_dir: Path, reported: list[int], keys: list[str]) -> int:
    """Every key holds steps ``0..last`` with ``last >= max(reported)``; returns ``last``."""
    with Run(run_dir) as run:
        last = run.last_step()
        assert last is not None and last >= max(reported)
        for key in keys:
            assert run.series(key).steps.tolist() == list(range(last + 1)), key
        return last


def test_killed_training_keeps_every_committed_step(tmp_path):
    child = Child(tmp_path, TRAIN_SCRIPT, tmp_path / "run")
    try:
        reported = child.read_until(40)
        child.kill()
    finally:
        child.close()
    assert reported == list(range(len(reported)))
    last = _assert_contiguous_run(
        tmp_path / "run", reported, ["scalars/loss", "nonfinite/grad", "optim/lr/0"]
    )
    with Run(tmp_path / "run") as run:
        assert run.meta["status"] == "running"  # it never got to say otherwise
        assert np.isfinite(run.series("scalars/loss").values).all()
        norms = run.series("norms/grad_total")
        assert norms.steps.tolist() == list(range(0, last + 1, 3))
        # measured when the next step begins, committed in that same flush
        assert run.series("updates/norm_total").steps.tolist() == norms.steps.tolist()


def test_writer_killed_at_random_moments_leaves_a_contiguous_prefix(tmp_path):
    rng = random.Random(1234)
    targets = [rng.randrange(5, 150) for _ in range(4)]
    children = [
        Child(tmp_path, APPEND_SCRIPT, tmp_path / f"run{i}", 100_000, 0)
        for i in range(len(targets))
    ]
    try:
        reported = []
        for child, target in zip(children, targets, strict=True):
            steps = child.read_until(target)
            time.sleep(rng.uniform(0, 0.02))  # land anywhere, mid-transaction included
            child.kill()
            reported.append(steps)
    finally:
        for child in children:
            child.close()
    keys = [f"k/{i:02d}" for i in range(40)] + ["arr"]
    for i, steps in enumerate(reported):
        last = _assert_contiguous_run(tmp_path / f"run{i}", steps, keys)
        with Run(tmp_path / f"run{i}") as run:
            np.testing.assert_array_equal(run.series("k/07").values, np.arange(last + 1) + 0.07)
            np.testing.assert_array_equal(run.series("arr").values[:, 5], np.arange(last + 1))


def test_reader_follows_a_live_writer(tmp_path):
    steps = 150
    child = Child(tmp_path, APPEND_SCRIPT, tmp_path / "run", steps, 0.01)
    try:
        child.read_until(1)
        seen: list[int] = []
        with Run(tmp_path / "run") as run:
            while child.proc.poll() is None and len(seen) < 200:
                last = run.last_step()
                loss = run.series("k/00")
                assert loss.steps.tolist() == list(range(len(loss)))
                assert len(loss) >= last + 1  # a later snapshot, never an earlier one
                seen.append(last)
                time.sleep(0.01)
            reported = child.finish()
            assert reported == list(range(steps))
            assert seen == sorted(seen) and seen[-1] > seen[0], seen
            assert len(set(seen)) >= 5, f"too few distinct snapshots: {seen}"
            assert run.last_step() == steps - 1  # the same reader sees the end
            np.testing.assert_array_equal(run.series("k/39").values, np.arange(steps) + 0.39)
            assert run.series("arr").values.shape == (steps, 64)
    finally:
        child.close()


def test_a_non_numeric_scalar_is_a_type_error_naming_the_key(tmp_path):
    writer = RunWriter(tmp_path / "r")
    with pytest.raises(TypeError, match=r"record key 'note' at step 2: expected a number"):
        writer.append([Record(2, {"note": "high"})])
    writer.append([Record(2, {"x": 1.0})])  # still usable
    writer.close()
    assert Run(tmp_path / "r").keys() == ["x"]
