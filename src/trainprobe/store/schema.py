"""The run database layout, shared by the writer and the reader.

One SQLite file, ``run.db``, inside the run directory:

- ``meta(key, value)``: JSON values (probes and settings, model summary, versions).
- ``keys(id, name, kind)``: every record key once; ``kind`` is ``scalar`` or ``array``.
- ``scalars(key_id, step, value)``: one row per (key, step), ``REAL``.
- ``arrays(key_id, step, dtype, shape, data)``: typed blobs (see :mod:`.codec`).

Rows are only ever inserted (append-only); a transaction holds whole steps. The one
exception is explicit: ``RunWriter(resume=True, resume_from=step)`` deletes the rows at
``step`` and later (a preempted job's steps past its checkpoint) in one transaction and
logs it in ``meta`` as ``truncated``. ``meta`` also holds ``status`` (``running``,
``finished``, ``failed: ...``) and ``writer`` (pid, host, start of the last writer); see
:mod:`.lifecycle`.
"""

from __future__ import annotations

DB_NAME = "run.db"
FORMAT = "trainprobe-run"
SCHEMA_VERSION = 1

DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS keys ("
    " id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
    " kind TEXT NOT NULL CHECK (kind IN ('scalar', 'array')))",
    "CREATE TABLE IF NOT EXISTS scalars ("
    " key_id INTEGER NOT NULL, step INTEGER NOT NULL, value REAL,"
    " PRIMARY KEY (key_id, step)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS arrays ("
    " key_id INTEGER NOT NULL, step INTEGER NOT NULL, dtype TEXT NOT NULL,"
    " shape TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (key_id, step))",
)
