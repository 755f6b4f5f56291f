"""`trainprobe export`: long CSV/Parquet tables of scalar series; arrays skipped; errors."""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.cli import export as export_cli


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trainprobe")
    export_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def _run(tmp_path):
    steps = np.arange(0, 50, 10)
    loss = np.array([2.0, 1.5, np.nan, 0.75, 0.1 + 1e-12])
    return write_run(
        tmp_path / "run",
        {
            "scalars/loss": (steps, loss),
            "norms/grad/fc.weight": (steps[:3], [0.5, 0.25, 0.125]),
            "hessian_density/density": (steps, np.ones((5, 4))),
        },
    )


def test_csv_long_format_round_trips(tmp_path, capsys):
    run = _run(tmp_path)
    assert _cli([str(run.run_dir)]) == 0
    captured = capsys.readouterr()
    out = run.run_dir / "series.csv"
    assert f"export: {out}  (8 rows, 2 keys)" in captured.out
    assert "skipped 1 array-valued key" in captured.err
    assert "hessian_density/density" in captured.err
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "key", "value"]
    assert rows[1] == ["0", "scalars/loss", "2.0"] and rows[3] == ["20", "scalars/loss", ""]
    assert float(rows[5][2]) == 0.1 + 1e-12  # repr: exact round trip
    assert rows[6:] == [
        ["0", "norms/grad/fc.weight", "0.5"],
        ["10", "norms/grad/fc.weight", "0.25"],
        ["20", "norms/grad/fc.weight", "0.125"],
    ]


def test_prefix_and_out(tmp_path, capsys):
    run = _run(tmp_path)
    out = tmp_path / "deep" / "grads.csv"
    assert _cli([str(run.run_dir), "--prefix", "norms/", "--out", str(out)]) == 0
    assert "(3 rows, 1 keys)" in capsys.readouterr().out
    assert {row[1] for row in list(csv.reader(out.open()))[1:]} == {"norms/grad/fc.weight"}


def test_csv_reads_in_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    run = _run(tmp_path)
    rows, keys, skipped = export_cli.export(run.run_dir, tmp_path / "x.csv")
    assert (rows, keys, skipped) == (8, 2, ["hessian_density/density"])
    frame = pd.read_csv(tmp_path / "x.csv")
    wide = frame.pivot(index="step", columns="key", values="value")
    assert np.isnan(wide.loc[20, "scalars/loss"]) and wide.loc[10, "norms/grad/fc.weight"] == 0.25


def test_parquet(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    run = _run(tmp_path)
    assert _cli([str(run.run_dir), "--format", "parquet"]) == 0
    table = pq.read_table(run.run_dir / "series.parquet").to_pydict()
    assert table["step"][:3] == [0, 10, 20] and table["key"][0] == "scalars/loss"
    assert table["value"][2] is None and len(table["value"]) == 8


def test_parquet_without_pyarrow_names_the_install(tmp_path, capsys, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        export_cli.export(run.run_dir, tmp_path / "x.parquet", "parquet")
    assert _cli([str(run.run_dir), "--format", "parquet"]) == 2
    assert "error: --format parquet needs pyarrow: pip install pyarrow" in capsys.readouterr().err
    assert not (run.run_dir / "series.parquet").exists()


def test_errors(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ValueError, match=r"no scalar keys starting with 'nope/'.*drop --prefix"):
        export_cli.export(run.run_dir, tmp_path / "x.csv", prefix="nope/")
    with pytest.raises(ValueError, match="unknown export format 'xlsx'; choose one of csv"):
        export_cli.export(run.run_dir, tmp_path / "x.xlsx", "xlsx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_cli.export(tmp_path / "missing", tmp_path / "x.csv")
    with pytest.raises(SystemExit):
        _cli([str(run.run_dir), "--format", "xlsx"])
