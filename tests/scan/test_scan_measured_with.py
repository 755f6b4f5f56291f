"""A checkpoint scan leaves what its curvature probes ran on in the run metadata, as a
live run does (``meta["measured_with"]``), and the report names a fallback to fd."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tests.cases import OnceAct
from trainprobe.cli.report import probe_notes
from trainprobe.probes import HessianTop, every
from trainprobe.scan import scan
from trainprobe.store import Run


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _once() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), OnceAct(), nn.Linear(8, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)


def _scan(tmp_path, model_fn, name: str) -> Run:
    ckpts = tmp_path / name
    ckpts.mkdir()
    model = model_fn()
    for step in (0, 10):
        torch.save(model.state_dict(), ckpts / f"step_{step:06d}.pt")
        with torch.no_grad():
            model[0].weight.mul_(1.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        result = scan(
            ckpts,
            model_fn=model_fn,
            data_fn=_batch,
            probes=[HessianTop(schedule=every(1), max_iter=4)],
            progress=False,
        )
    assert result.scanned == (0, 10)
    return Run(result.run_dir)


def test_a_scan_records_the_engine_of_each_curvature_probe(tmp_path):
    plain = _scan(tmp_path, _plain, "plain")
    assert plain.meta["measured_with"] == {
        "hessian": {"engine": "graph", "attention": "math", "since_step": 0}
    }
    assert probe_notes(plain) == []
    once = _scan(tmp_path, _once, "once")
    how = once.meta["measured_with"]["hessian"]
    assert how["engine"] == "fd" and how["since_step"] == 0 and "OnceTanh" in how["fallback"]
    assert any("ran on finite differences" in note for note in probe_notes(once))
