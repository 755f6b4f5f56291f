"""``trainprobe export``: a run's scalar series as one long table (CSV or Parquet).

Long format, one row per stored value: ``step, key, value`` (keys in recording order, steps
increasing within a key). NaN is an empty CSV field and a Parquet null. Array-valued keys
(e.g. ``hessian_density/density``) are skipped and named on stderr: flattened they would
multiply the rows by their size; read them with ``Run(run_dir).arrays(key)``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..store import Run

FORMATS = ("csv", "parquet")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the ``trainprobe`` subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "export",
        help="write a run's scalar series as CSV or Parquet (long format)",
        description="Write every scalar series of RUN_DIR as one long table with the "
        "columns step, key, value, for pandas or polars. Array-valued keys are skipped "
        "(named on stderr). Parquet needs pyarrow.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument(
        "--format", choices=FORMATS, default="csv", help="file format (default: %(default)s)"
    )
    parser.add_argument("--out", help="output file (default: RUN_DIR/series.csv or .parquet)")
    parser.add_argument("--prefix", default="", help="only keys starting with this, e.g. norms/")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """The ``export`` command: write the file, print its path and what was skipped.

    Returns:
        0 on success; 2 when Parquet is asked for and pyarrow is missing. A missing or
        unreadable run raises (``trainprobe``'s ``main`` prints it and exits 2).
    """
    if args.out:
        out = Path(args.out)
    else:
        from ..store import Run  # here: `trainprobe --help` builds this parser

        with Run(args.run_dir) as run:  # RUN_DIR, or its run.db
            out = run.run_dir / f"series.{args.format}"
    try:
        rows, keys, skipped = export(args.run_dir, out, args.format, prefix=args.prefix)
    except ImportError as err:
        print(f"trainprobe export: error: {err}", file=sys.stderr)
        return 2
    if skipped:
        print(
            f"skipped {len(skipped)} array-valued key{'s' if len(skipped) != 1 else ''} "
            f"(read them with Run(run_dir).arrays(key)): {', '.join(skipped)}",
            file=sys.stderr,
        )
    print(f"export: {out}  ({rows} rows, {keys} keys)")
    return 0


def export(
    run_dir: str | Path, out: str | Path, fmt: str = "csv", *, prefix: str = ""
) -> tuple[int, int, list[str]]:
    """Write the scalar series of a run under ``prefix`` to ``out`` (overwritten).

    Args:
        run_dir: the run directory.
        out: the file to write; its parent directories are created.
        fmt: ``"csv"`` (standard library only) or ``"parquet"`` (needs pyarrow).
        prefix: only keys starting with it.

    Returns:
        ``(rows written, scalar keys written, array keys skipped)``.

    Raises:
        ValueError: ``fmt`` is not csv or parquet, or no scalar key starts with ``prefix``.
        ImportError: ``fmt`` is parquet and pyarrow is not installed.
        FileNotFoundError: ``run_dir`` is not a run (from :class:`Run`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(
                "--format parquet needs pyarrow: pip install pyarrow (or use --format csv)"
            ) from err
    from ..store import Run  # here, not above: `trainprobe --help` builds this parser

    with Run(run_dir) as source:
        scalar, skipped = _split(source, prefix)
        if not scalar:
            where = f" starting with {prefix!r}" if prefix else ""
            raise ValueError(
                f"{run_dir} has no scalar keys{where} to export; list the keys with "
                "Run(run_dir).keys()" + (" or drop --prefix" if prefix else "")
            )
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            rows = _write_csv(source, scalar, out)
        else:
            rows = _write_parquet(source, scalar, out, pa, pq)
    return rows, len(scalar), skipped


def _split(source: Run, prefix: str) -> tuple[list[str], list[str]]:
    scalar, arrays = [], []
    for key in source.keys(prefix):
        (scalar if source._key(key)[1] == "scalar" else arrays).append(key)
    return scalar, arrays


def _write_csv(source: Run, keys: list[str], out: Path) -> int:
    rows = 0
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("step", "key", "value"))
        for key in keys:
            s = source.series(key)
            writer.writerows(
                (int(step), key, "" if math.isnan(v) else repr(float(v)))
                for step, v in zip(s.steps, s.values, strict=True)
            )
            rows += len(s)
    return rows


def _write_parquet(source: Run, keys: list[str], out: Path, pa, pq) -> int:
    import numpy as np

    series = [source.series(key) for key in keys]
    steps = np.concatenate([s.steps for s in series])
    values = np.concatenate([s.values for s in series])
    codes = np.repeat(np.arange(len(keys), dtype=np.int32), [len(s) for s in series])
    table = pa.table(
        {
            "step": pa.array(steps, pa.int64()),
            "key": pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(keys, pa.string())),
            "value": pa.array(values, pa.float64(), mask=np.isnan(values)),
        }
    )
    pq.write_table(table, out)
    return int(steps.size)
