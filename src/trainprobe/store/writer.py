"""Append-only, crash-safe writer of a run directory (embedded SQLite, WAL mode)."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .codec import encode_array
from .lifecycle import RunInUseError, check_is_not_a_file, identity, lock_run_dir
from .run import RunError
from .schema import DB_NAME, DDL, FORMAT, SCHEMA_VERSION

Value = float | np.ndarray

BUSY_SECONDS = 5.0
"""How long opening ``run.db`` waits for a lock another program holds before giving up."""


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
    One writer at a time: the writer holds ``run_dir``'s writer lock
    (:mod:`~trainprobe.store.lifecycle`) until :meth:`close`, and records itself and
    ``status: "running"`` in the metadata; :meth:`close` turns a status still
    ``"running"`` into ``"finished"``.

    Args:
        run_dir: directory to create (parents too) or, with ``resume``, to reopen.
        resume: append to an existing run instead of refusing to touch it.
        resume_from: with ``resume``, the step the resumed job continues at (the step of
            the checkpoint it restarted from): every stored value at this step or later,
            written by the job before it stopped, is deleted first, in one transaction,
            and the deletion is recorded in the metadata under ``truncated``. Readers
            never see two values for one step and key.
        overwrite: delete the run already in ``run_dir`` (its database only) and start a
            new one there.

    Raises:
        FileExistsError: ``run_dir`` already holds a run and neither ``resume`` nor
            ``overwrite`` is set.
        FileNotFoundError: ``resume`` is true but there is no run to resume.
        RunInUseError: another live process writes the run (named: pid, host).
        PermissionError: ``run_dir`` or its ``run.db`` cannot be written (read-only).
        ValueError: ``run_dir`` is a file, or the options contradict each other.
        TypeError: ``resume_from`` is not an integer.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        resume: bool = False,
        resume_from: int | None = None,
        overwrite: bool = False,
    ) -> None:
        check_open_options(resume=resume, resume_from=resume_from, overwrite=overwrite)
        self.run_dir = Path(run_dir)
        check_is_not_a_file(self.run_dir)
        db = self.run_dir / DB_NAME
        if resume and not db.exists():
            raise FileNotFoundError(
                f"resume=True but {self.run_dir} holds no run ({DB_NAME} is missing); "
                "drop resume=True to start a new run there"
            )
        self._conn: sqlite3.Connection | None = None
        self._writer = identity()
        self._lock = lock_run_dir(self.run_dir, self._writer, resume=resume)
        try:
            if db.exists() and not (resume or overwrite):
                raise FileExistsError(
                    f"{self.run_dir} already holds a run ({DB_NAME}); pass resume=True to "
                    "append to it, overwrite=True to replace it, or choose a new run_dir"
                )
            if overwrite:
                for suffix in ("", "-wal", "-shm"):
                    (self.run_dir / f"{DB_NAME}{suffix}").unlink(missing_ok=True)
            self._conn = _connect(db)
            self._start()
            if resume_from is not None:
                self._truncate(resume_from)
        except BaseException:
            if self._conn is not None:
                self._conn.close()
            self._lock.release()
            raise
        self._key_ids: dict[str, tuple[int, str]] = {
            name: (key_id, kind)
            for key_id, name, kind in self._conn.execute("SELECT id, name, kind FROM keys")
        }

    def _start(self) -> None:
        """Create the tables, mark the format, and record this writer and ``running``."""
        with self._conn:
            self._conn.execute("BEGIN")
            for statement in DDL:
                self._conn.execute(statement)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('format', ?), ('schema_version', ?)",
                (json.dumps(FORMAT), json.dumps(SCHEMA_VERSION)),
            )
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('status', ?), ('writer', ?)",
                (json.dumps("running"), json.dumps(self._writer)),
            )

    def _truncate(self, step: int) -> None:
        """Delete every value at ``step`` or later (and keys left empty); log it in meta."""
        with self._conn:
            self._conn.execute("BEGIN")
            rows = sum(
                self._conn.execute(f"DELETE FROM {table} WHERE step >= ?", (step,)).rowcount
                for table in ("scalars", "arrays")
            )
            self._conn.execute(
                "DELETE FROM keys WHERE NOT EXISTS (SELECT 1 FROM scalars WHERE key_id = keys.id)"
                " AND NOT EXISTS (SELECT 1 FROM arrays WHERE key_id = keys.id)"
            )
            (old,) = self._conn.execute(
                "SELECT coalesce(max(value), '[]') FROM meta WHERE key = 'truncated'"
            ).fetchone()
            entry = {"from_step": step, "rows": rows, "at": self._writer["started"]}
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('truncated', ?)",
                (json.dumps([*json.loads(old), entry]),),
            )

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
        """Mark a run still ``running`` as ``finished``, merge the WAL into ``run.db``, close
        and let the writer lock go: a finished run is a single file."""
        if self._conn is None:
            return
        try:
            with self._conn:
                self._conn.execute("BEGIN")
                self._conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'status' AND value = ?",
                    (json.dumps("finished"), json.dumps("running")),
                )
            with contextlib.suppress(sqlite3.OperationalError):  # a live reader keeps WAL on
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.execute("PRAGMA journal_mode=DELETE")  # a finished run is one file
        finally:
            self._conn.close()
            self._conn = None
            self._lock.release()


def check_open_options(*, resume: bool, resume_from: int | None, overwrite: bool) -> None:
    """Check :class:`RunWriter`'s (and ``watch``'s) options for opening a run directory.

    Raises:
        TypeError: ``resume_from`` is not an integer.
        ValueError: ``resume_from`` without ``resume`` or below 0, or ``overwrite``
            together with ``resume``.
    """
    if resume and overwrite:
        raise ValueError(
            "resume=True and overwrite=True contradict each other: resume=True continues the "
            "run in run_dir, overwrite=True deletes it; pass one of them"
        )
    if resume_from is None:
        return
    if isinstance(resume_from, bool) or not isinstance(resume_from, numbers.Integral):
        raise TypeError(
            f"resume_from must be an int step, got {type(resume_from).__name__}; pass the step "
            "your restored checkpoint continues at"
        )
    if resume_from < 0:
        raise ValueError(f"resume_from must be a step >= 0, got {resume_from}")
    if not resume:
        raise ValueError(
            f"resume_from={resume_from} continues an existing run: pass resume=True with it"
        )


def _connect(db: Path) -> sqlite3.Connection:
    """Open ``db`` for writing in WAL mode; SQLite's errors translated."""
    try:
        conn = sqlite3.connect(
            db, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: safe against process death
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise RunInUseError(
                f"{db} is locked by another program (SQLite: {err}); close the program that "
                "holds it (a database browser, a copy tool) and try again",
                {},
            ) from err
        raise PermissionError(
            f"cannot write {db} (SQLite: {err}): the run directory or {DB_NAME} is read-only; "
            "choose a writable run_dir, or copy the run somewhere writable to continue it"
        ) from err
    except sqlite3.DatabaseError as err:
        raise RunError(
            f"{db} is not a trainprobe run database ({err}); choose another run_dir, or pass "
            "overwrite=True to replace the file"
        ) from err
