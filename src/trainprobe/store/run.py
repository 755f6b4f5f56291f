"""Read-only view of a run directory, safe to open while training still writes."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .codec import decode_array
from .lifecycle import RunState, run_state
from .schema import DB_NAME, FORMAT


class RunError(ValueError):
    """A run directory exists but cannot be read as a trainprobe run."""


def _open_error(db: Path, err: Exception) -> RunError:
    """The :class:`RunError` to raise for ``err`` (SQLite's or JSON's), met opening ``db``."""
    if "unable to open" in str(err):
        return RunError(
            f"cannot open {db} ({err}): check that you may read it, and for a run still in "
            "WAL mode (run.db-wal beside it) that its directory is readable; or copy the run "
            "directory somewhere you may write and pass the copy"
        )
    return RunError(
        f"{db} cannot be read as a trainprobe run ({err}); the file is corrupt or not a "
        "run database: re-create the run, or restore run.db from a copy"
    )


@dataclass(frozen=True)
class Series:
    """One record key over steps.

    Attributes:
        key: the record key.
        steps: ``[n]`` int64, increasing.
        values: ``[n]`` float64 for scalar keys (NaN where the value was NaN);
            ``[n, *shape]`` for array keys of a fixed shape.
    """

    key: str
    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.shape[0])


class Run:
    """A trainprobe run, read back as numpy.

    Every query starts a fresh read transaction, so a ``Run`` opened while a
    training process is writing sees each step as soon as it is committed.

    Args:
        run_dir: the directory given to ``trainprobe.watch(run_dir=...)``, or its
            ``run.db`` file.

    Raises:
        FileNotFoundError: the directory or its ``run.db`` does not exist.
        RunError: ``run.db`` is not a readable trainprobe database, or ``run_dir`` is a
            file other than a ``run.db``.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._memo: dict[str, Series] | None = None
        if self.run_dir.name == DB_NAME and self.run_dir.is_file():
            self.run_dir = self.run_dir.parent  # RUN/run.db: the run is its directory
        elif self.run_dir.is_file():
            raise RunError(
                f"{self.run_dir} is a file, not a run directory; pass the directory that "
                f"holds {DB_NAME}"
            )
        db = self.run_dir / DB_NAME
        if not self.run_dir.is_dir():
            raise FileNotFoundError(
                f"run directory {self.run_dir} does not exist; pass the directory that "
                "trainprobe.watch(run_dir=...) or `trainprobe demo --out` wrote"
            )
        if not db.is_file():
            raise FileNotFoundError(
                f"{self.run_dir} is not a trainprobe run: {DB_NAME} is missing; pass the "
                "directory that trainprobe.watch(run_dir=...) or `trainprobe demo --out` wrote"
            )
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
            rows = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            if rows.get("format") != json.dumps(FORMAT):
                raise RunError(
                    f"{db} is an SQLite file but not a trainprobe run (no format "
                    "marker); pass a run directory written by trainprobe"
                )
            meta = {key: json.loads(value) for key, value in rows.items()}
        except (sqlite3.DatabaseError, ValueError) as err:
            if self._conn is not None:
                self._conn.close()
            if isinstance(err, RunError):
                raise
            raise _open_error(db, err) from err
        self.meta: dict[str, Any] = meta

    def state(self) -> RunState:
        """Whether the run finished, failed, is still written by a live process, or was
        abandoned by one that died; read now (see :mod:`~trainprobe.store.lifecycle`)."""
        return run_state(self.run_dir, self._meta_now)

    def _meta_now(self, key: str) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r})"

    def keys(self, prefix: str = "") -> list[str]:
        """Record keys starting with ``prefix``, in the order first written."""
        rows = self._query(
            "SELECT name FROM keys WHERE substr(name, 1, ?) = ? ORDER BY id", (len(prefix), prefix)
        )
        return [name for (name,) in rows]

    def __contains__(self, key: object) -> bool:
        return bool(self._query("SELECT 1 FROM keys WHERE name = ?", (key,)))

    @contextlib.contextmanager
    def reading_once(self) -> Iterator[Run]:
        """Within the block, :meth:`series` reads each key from the database once and hands
        the same (read-only) arrays to every later caller: for one pass of several readers
        over a large run, e.g. ``analyze`` and then ``dashboard.build``. Steps committed
        meanwhile show only for keys not read yet; outside the block every read is fresh.
        """
        outer = self._memo
        self._memo = {} if outer is None else outer
        try:
            yield self
        finally:
            self._memo = outer

    def kind(self, key: str) -> str:
        """``"scalar"`` (one number per step) or ``"array"``, read without the values.

        Raises:
            KeyError: the run has no such key.
        """
        return self._key(key)[1]

    def series(self, key: str) -> Series:
        """Steps and values of ``key``.

        Raises:
            KeyError: the run has no such key (the message lists close matches).
        """
        if self._memo is not None and key in self._memo:
            return self._memo[key]
        series = self._read_series(key)
        if self._memo is not None:
            series.steps.setflags(write=False)  # shared by every reader in the block
            series.values.setflags(write=False)
            self._memo[key] = series
        return series

    def _read_series(self, key: str) -> Series:
        key_id, kind = self._key(key)
        if kind == "scalar":
            rows = self._query(
                "SELECT step, value FROM scalars WHERE key_id = ? ORDER BY step", (key_id,)
            )
            steps = np.array([r[0] for r in rows], dtype=np.int64)
            values = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
            return Series(key, steps, values)
        rows = self._query(
            "SELECT step, dtype, shape, data FROM arrays WHERE key_id = ? ORDER BY step", (key_id,)
        )
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        arrays = [decode_array(r[1], r[2], r[3]) for r in rows]
        if len({a.shape for a in arrays}) > 1:
            raise RunError(f"array key {key!r} changes shape over steps; read it with .arrays()")
        values = np.stack(arrays) if arrays else np.empty((0,))
        return Series(key, steps, values)

    def arrays(self, key: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """Steps and the list of arrays of an array key (shapes may differ by step)."""
        key_id, _ = self._key(key)
        rows = self._query(
            "SELECT step, dtype, shape, data FROM arrays WHERE key_id = ? ORDER BY step", (key_id,)
        )
        return (
            np.array([r[0] for r in rows], dtype=np.int64),
            [decode_array(r[1], r[2], r[3]) for r in rows],
        )

    def layers(self, prefix: str) -> list[str]:
        """The ``<layer>`` parts of keys ``prefix/<layer>``, in recording order."""
        head = prefix.rstrip("/") + "/"
        return [key[len(head) :] for key in self.keys(head)]

    def param_names(self) -> list[str]:
        """Trainable parameter names in model order, as the monitor recorded them.

        Empty when the run holds no model summary (e.g. a run written by hand).
        """
        model = self.meta.get("model")
        params = model.get("params") if isinstance(model, dict) else None
        if isinstance(params, list) and all(isinstance(p, str) for p in params):
            return list(params)
        return []

    def last_step(self) -> int | None:
        """The largest step stored so far, or ``None`` for an empty run."""
        row = self._query(
            "SELECT max(s) FROM (SELECT max(step) AS s FROM scalars"
            " UNION ALL SELECT max(step) FROM arrays)"
        )
        return None if row[0][0] is None else int(row[0][0])

    def to_pandas(self, prefix: str = ""):
        """Scalar keys under ``prefix`` as a wide DataFrame (index: step, one column a key).

        Raises:
            ImportError: pandas is not installed (``pip install trainprobe[pandas]``).
        """
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(
                "Run.to_pandas() needs pandas: pip install pandas (or trainprobe[pandas])"
            ) from err
        columns = {}
        for key in self.keys(prefix):
            if self._key(key)[1] == "scalar":
                s = self.series(key)
                columns[key] = pd.Series(s.values, index=pd.Index(s.steps, name="step"))
        return pd.DataFrame(columns)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, key: str) -> tuple[int, str]:
        rows = self._query("SELECT id, kind FROM keys WHERE name = ?", (key,))
        if not rows:
            import difflib

            close = difflib.get_close_matches(key, self.keys(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; list them with run.keys()"
            raise KeyError(f"run {self.run_dir} has no key {key!r}{hint}")
        return int(rows[0][0]), rows[0][1]

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise RunError(f"reading {self.run_dir / DB_NAME} failed ({err})") from err
