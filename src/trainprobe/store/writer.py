"""Append-only, crash-safe writer of a run directory (embedded SQLite, WAL mode)."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .codec import encode_array
from .schema import DB_NAME, DDL, FORMAT, SCHEMA_VERSION

Value = float | np.ndarray


@dataclass(frozen=True)
class Record:
    """Every value measured at one step, on the host.

    Attributes:
        step: the training step the values belong to.
        values: ``{key: float | np.ndarray}``; keys are ``probe/metric[/layer]``.
    """

    step: int
    values: Mapping[str, Value] = field(default_factory=dict)


class RunWriter:
    """Writes records into ``run_dir/run.db``; one transaction per :meth:`append`.

    WAL journaling makes every committed transaction survive the writing process
    being killed (SIGKILL included): a reader then sees every committed step.

    Args:
        run_dir: directory to create (parents too) or, with ``resume``, to reopen.
        resume: append to an existing run instead of refusing to touch it.

    Raises:
        FileExistsError: ``run_dir`` already holds a run and ``resume`` is false.
        FileNotFoundError: ``resume`` is true but there is no run to resume.
    """

    def __init__(self, run_dir: str | Path, *, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        db = self.run_dir / DB_NAME
        if db.exists() and not resume:
            raise FileExistsError(
                f"{self.run_dir} already holds a run ({DB_NAME}); pass resume=True to append "
                "to it, or choose a new run_dir"
            )
        if resume and not db.exists():
            raise FileNotFoundError(
                f"resume=True but {self.run_dir} holds no run ({DB_NAME} is missing); "
                "drop resume=True to start a new run there"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: safe against process death
        with self._conn:
            self._conn.execute("BEGIN")
            for statement in DDL:
                self._conn.execute(statement)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('format', ?), ('schema_version', ?)",
                (json.dumps(FORMAT), json.dumps(SCHEMA_VERSION)),
            )
        self._key_ids: dict[str, tuple[int, str]] = {
            name: (key_id, kind)
            for key_id, name, kind in self._conn.execute("SELECT id, name, kind FROM keys")
        }

    @property
    def last_step(self) -> int | None:
        """The largest step stored so far, or ``None`` for an empty run."""
        row = self._conn.execute(
            "SELECT max(s) FROM (SELECT max(step) AS s FROM scalars"
            " UNION ALL SELECT max(step) FROM arrays)"
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def set_meta(self, items: Mapping[str, Any]) -> None:
        """Store JSON-serialisable metadata (insert or replace per key)."""
        rows = [(key, json.dumps(value, default=str)) for key, value in items.items()]
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

    def append(self, records: Iterable[Record]) -> None:
        """Write ``records`` in one transaction (all or nothing).

        Raises:
            ValueError: a key switches between scalar and array, or a (key, step)
                pair is written twice.
            TypeError: a value is neither a number nor a numeric array.
        """
        known = dict(self._key_ids)
        try:
            with self._conn:
                self._conn.execute("BEGIN")
                scalars, arrays = self._rows(records)
                self._conn.executemany("INSERT INTO scalars VALUES (?, ?, ?)", scalars)
                self._conn.executemany("INSERT INTO arrays VALUES (?, ?, ?, ?, ?)", arrays)
        except sqlite3.IntegrityError as err:
            self._key_ids = known  # rolled back: forget keys added in this transaction
            raise ValueError(
                f"a key was recorded twice for the same step ({err}); steps must increase "
                "and a run may be resumed only past its last stored step"
            ) from err
        except BaseException:
            self._key_ids = known
            raise

    def _rows(self, records: Iterable[Record]) -> tuple[list[tuple], list[tuple]]:
        """``scalars`` and ``arrays`` table rows of ``records`` (registers new keys)."""
        scalars: list[tuple] = []
        arrays: list[tuple] = []
        for record in records:
            step = int(record.step)
            for key, value in record.values.items():
                if isinstance(value, np.ndarray) and value.ndim > 0:
                    arrays.append((self._key_id(key, "array"), step, *encode_array(value)))
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError) as err:
                    raise TypeError(
                        f"record key {key!r} at step {step}: expected a number or a numeric "
                        f"array, got {type(value).__name__}"
                    ) from err
                nan_as_null = None if math.isnan(number) else number
                scalars.append((self._key_id(key, "scalar"), step, nan_as_null))
        return scalars, arrays

    def _key_id(self, name: str, kind: str) -> int:
        known = self._key_ids.get(name)
        if known is None:
            cursor = self._conn.execute("INSERT INTO keys (name, kind) VALUES (?, ?)", (name, kind))
            known = (int(cursor.lastrowid), kind)
            self._key_ids[name] = known
        if known[1] != kind:
            raise ValueError(
                f"key {name!r} holds {known[1]} values in this run but got a {kind}; "
                "record one kind of value per key"
            )
        return known[0]

    def close(self) -> None:
        """Merge the WAL into ``run.db`` and close: a finished run is a single file."""
        if self._conn is None:
            return
        with contextlib.suppress(sqlite3.OperationalError):  # a live reader keeps WAL mode on
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.execute("PRAGMA journal_mode=DELETE")  # a finished run is one file
        self._conn.close()
        self._conn = None
