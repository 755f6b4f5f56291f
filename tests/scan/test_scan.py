"""``trainprobe scan``: checkpoints -> the same monitor, probes and store as a live run."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trainprobe
from trainprobe.cli import scan as cli_scan
from trainprobe.curvature import criterion_loss
from trainprobe.probes import HessianTop, LayerNorms, LearningRate, LocalComplexity, UpdateNorms
from trainprobe.probes.schedules import every
from trainprobe.scan import (
    CheckpointError,
    CheckpointUpdate,
    find_checkpoint_files,
    first_batch,
    load_checkpoint,
    probes_from_names,
    scan,
)
from trainprobe.scan.checkpoints import check_weights, step_from_name
from trainprobe.scan.probes import split_probes

EVERY = 5


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 3))


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)


def probes() -> list:
    return [
        LayerNorms(schedule=every(EVERY)),
        HessianTop(schedule=every(EVERY)),
        LocalComplexity(schedule=every(EVERY)),
    ]


def train_with_checkpoints(ckpt_dir: Path, run_dir: Path, steps: int = 21) -> None:
    """Full-batch SGD, watched live; a checkpoint saved where the probes measure."""
    model, batch = build_model(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = criterion_loss(nn.CrossEntropyLoss())
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with trainprobe.watch(model, probes(), run_dir=run_dir, loss_fn=loss_fn) as mon:
        for step in range(steps):
            with mon.step(step, batch=batch) as s:
                loss = loss_fn(model, batch)
                loss.backward()
                s.log(loss=loss)
                if step % EVERY == 0:  # the weights the probes measure: before opt.step()
                    torch.save(model.state_dict(), ckpt_dir / f"step_{step:06d}.pt")
            opt.step()
            opt.zero_grad()


def quiet_scan(ckpt_dir: Path, **kwargs):
    kwargs.setdefault("model_fn", build_model)
    kwargs.setdefault("data_fn", make_batch)
    return scan(ckpt_dir, progress=False, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    train_with_checkpoints(root / "ckpts", root / "live")
    return root / "ckpts", root / "live"


def test_scan_matches_the_live_run(trained, tmp_path):
    ckpts, live = trained
    result = quiet_scan(ckpts, probes=probes(), run_dir=tmp_path / "scan")
    assert result.scanned == (0, 5, 10, 15, 20) and result.ok and result.failed == 0
    with trainprobe.Run(live) as a, trainprobe.Run(result.run_dir) as b:
        keys = [
            k for k in a.keys(prefix="") if k.startswith(("norms/", "hessian/eig_0", "regions/"))
        ]
        assert any(k.startswith("norms/weight/") for k in keys)
        assert "hessian/eig_0" in keys and "regions/train/total" in keys
        for key in [*keys, "scalars/loss"]:
            x, y = a.series(key), b.series(key)
            sel = np.isin(x.steps, y.steps)
            np.testing.assert_array_equal(x.steps[sel], y.steps)
            np.testing.assert_allclose(y.values, x.values[sel], rtol=1e-4, atol=1e-6, err_msg=key)
        update = b.series("scan/update_norm_total")
        assert update.steps.tolist() == [5, 10, 15, 20] and (update.values > 0).all()
        assert b.series("scan/steps_between").values.tolist() == [5.0] * 4


def test_default_probes_and_update_between_checkpoints(trained, tmp_path):
    ckpts, _ = trained
    result = quiet_scan(ckpts, run_dir=tmp_path / "scan")
    with trainprobe.Run(result.run_dir) as run:
        for key in ("norms/weight_total", "hessian/eig_0", "regions/train/total"):
            assert len(run.series(key)) == 5
        weights = {n: torch.load(ckpts / f"step_{s:06d}.pt") for n, s in (("a", 5), ("b", 10))}
        expected = torch.linalg.vector_norm(
            torch.cat([(weights["b"][k] - weights["a"][k]).flatten() for k in weights["a"]])
        )
        got = run.series("scan/update_norm_total")
        assert got.values[got.steps.tolist().index(10)] == pytest.approx(float(expected), 1e-5)


def test_resume_measures_only_new_checkpoints(trained, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for s in (0, 5, 10):
        (ckpts / f"step_{s:06d}.pt").write_bytes((trained[0] / f"step_{s:06d}.pt").read_bytes())
    run_dir = tmp_path / "scan"
    first = quiet_scan(ckpts, run_dir=run_dir)
    assert first.scanned == (0, 5, 10)
    again = quiet_scan(ckpts, run_dir=run_dir)
    assert again.scanned == () and again.already == (0, 5, 10) and again.ok
    (ckpts / "step_000020.pt").write_bytes((trained[0] / "step_000020.pt").read_bytes())
    third = quiet_scan(ckpts, run_dir=run_dir)
    assert third.scanned == (20,) and third.already == (0, 5, 10)
    with trainprobe.Run(run_dir) as run:
        assert run.series("hessian/eig_0").steps.tolist() == [0, 5, 10, 20]
        between = run.series("scan/steps_between")  # seeded from step 10 on resume
        assert between.steps.tolist() == [5, 10, 20] and between.values[-1] == 10.0
    (ckpts / "step_000015.pt").write_bytes((trained[0] / "step_000015.pt").read_bytes())
    late = quiet_scan(ckpts, run_dir=run_dir)
    assert late.scanned == () and "before the run's last step 20" in late.skipped["step_000015.pt"]


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malformed_checkpoints_are_reported_and_skipped(trained, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    good = torch.load(trained[0] / "step_000000.pt")
    torch.save(good, ckpts / "step_0.pt")
    torch.save({"model": good, "step": 10}, ckpts / "last.pth")
    data = (trained[0] / "step_000005.pt").read_bytes()
    (ckpts / "step_1.pt").write_bytes(data[: len(data) // 2])
    torch.save({("x" + k): v for k, v in good.items()}, ckpts / "step_2.pt")
    torch.save({**good, "2.weight": torch.zeros(5, 12)}, ckpts / "step_3.pt")
    marker = tmp_path / "code_ran"
    torch.save({"model": good, "evil": RunsCode(marker)}, ckpts / "step_4.pt")
    (ckpts / "notes.txt").write_text("not a checkpoint")
    result = quiet_scan(ckpts, run_dir=tmp_path / "scan")
    assert result.scanned == (0, 10) and result.failed == 4 and not result.ok
    reasons = result.skipped
    assert set(reasons) == {"step_1.pt", "step_2.pt", "step_3.pt", "step_4.pt"}
    assert reasons["step_1.pt"].startswith("step_1.pt: unreadable or truncated")
    assert "missing keys [0.weight" in reasons["step_2.pt"]
    assert "unexpected keys [x0.weight" in reasons["step_2.pt"]
    assert "wrong shapes (2.weight: checkpoint [5, 12] vs model [3, 12])" in reasons["step_3.pt"]
    assert "refused to unpickle" in reasons["step_4.pt"]
    assert "posix.system" in reasons["step_4.pt"] and "--trust-checkpoints" in reasons["step_4.pt"]
    assert not marker.exists()


def test_a_whole_pickled_model_needs_trust(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save(build_model(), ckpts / "model_7.pt")
    with pytest.raises(CheckpointError, match=r"model_7.pt: refused to unpickle.*--trust-checkp"):
        load_checkpoint(ckpts / "model_7.pt")
    refused = quiet_scan(ckpts, run_dir=tmp_path / "a")
    assert refused.scanned == () and "trust_checkpoints=True" in refused.skipped["model_7.pt"]
    trusted = quiet_scan(ckpts, run_dir=tmp_path / "b", trust_checkpoints=True)
    assert trusted.scanned == (7,) and trusted.ok


def test_checkpoint_formats_and_steps(tmp_path):
    sd = build_model().state_dict()
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "global_step": 3},
        tmp_path / "a.bin",
    )
    ckpt = load_checkpoint(tmp_path / "a.bin")
    assert ckpt.step == 3 and set(ckpt.weights) == set(sd) and ckpt.optimizer_state is None
    torch.save(
        {"model_state_dict": sd, "epoch": torch.tensor(4), "optimizer": {"state": {}}},
        tmp_path / "b.pt",
    )
    assert load_checkpoint(tmp_path / "b.pt").step == 4
    assert load_checkpoint(tmp_path / "b.pt").optimizer_state == {"state": {}}
    assert step_from_name(Path("step=500.pt")) == 500
    assert step_from_name(Path("run2_ckpt_000500.pt")) == 500
    assert step_from_name(Path("final.pt")) is None
    torch.save(sd, tmp_path / "final.pt")
    with pytest.raises(CheckpointError, match=r"final.pt: no step.*rename it"):
        load_checkpoint(tmp_path / "final.pt")
    torch.save([1, 2], tmp_path / "list_1.pt")
    with pytest.raises(CheckpointError, match=r"list_1.pt: expected a state_dict.*got list"):
        load_checkpoint(tmp_path / "list_1.pt")
    torch.save({"model": {}}, tmp_path / "empty_1.pt")
    with pytest.raises(CheckpointError, match=r"empty_1.pt: no weights found"):
        load_checkpoint(tmp_path / "empty_1.pt")
    torch.save({"lr": 0.1}, tmp_path / "cfg_1.pt")
    with pytest.raises(CheckpointError, match=r"cfg_1.pt: no tensors found"):
        load_checkpoint(tmp_path / "cfg_1.pt")
    (tmp_path / "junk_1.pt").write_bytes(b"xx")
    with pytest.raises(CheckpointError, match=r"junk_1.pt: unreadable or truncated \(Unpick"):
        load_checkpoint(tmp_path / "junk_1.pt")
    assert [p.name for p in find_checkpoint_files(tmp_path)][:2] == ["a.bin", "b.pt"]


def test_safetensors(tmp_path, monkeypatch):
    path = tmp_path / "step_2.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"")
        with pytest.raises(CheckpointError, match=r"pip install safetensors"):
            load_checkpoint(path)
        return
    save_file(build_model().state_dict(), str(path))
    assert load_checkpoint(path).step == 2
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"pip install safetensors"):
        load_checkpoint(path)


def test_check_weights_lists_many_names():
    model = build_model()
    weights = {f"w{i}": torch.zeros(1) for i in range(7)}
    with pytest.raises(CheckpointError, match=r"f.pt: .*unexpected keys \[w0.*7 in all\)"):
        check_weights(Path("f.pt"), weights, model)


def test_optimizer_state_is_loaded_when_given(tmp_path):
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(make_batch()[0]).sum().backward()
    opt.step()
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, tmp_path / "c.pt"
    )
    probes_ = [LayerNorms(schedule=every(1)), LearningRate(), UpdateNorms()]
    without = quiet_scan(tmp_path, probes=probes_, run_dir=tmp_path / "a")
    assert "optimizer_fn=" in without.left_out["optim"]
    assert "scan/update_*" in without.left_out["updates"]

    def adam(m):
        return torch.optim.Adam(m.parameters(), lr=0.5)

    with_opt = quiet_scan(
        tmp_path, probes=[LearningRate()], run_dir=tmp_path / "b", optimizer_fn=adam
    )
    assert with_opt.ok and "optim" not in with_opt.left_out
    with trainprobe.Run(with_opt.run_dir) as run:
        assert run.series("optim/lr/0").values.tolist() == [0.01]  # the saved state's lr

    def sgd(m):
        return torch.optim.SGD([{"params": [p]} for p in m.parameters()], lr=0.1)

    bad = quiet_scan(tmp_path, probes=[LearningRate()], run_dir=tmp_path / "c", optimizer_fn=sgd)
    assert "c.pt: the optimizer state does not fit" in bad.skipped["c.pt"]


def test_a_step_that_fails_after_one_was_measured_is_reported(trained, tmp_path):
    calls = []

    def fails_after_the_first(model, batch):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return criterion_loss(nn.CrossEntropyLoss())(model, batch)

    result = quiet_scan(
        trained[0], probes=[LayerNorms()], run_dir=tmp_path / "s", loss_fn=fails_after_the_first
    )
    assert result.scanned == (0,) and result.failed == 4
    assert "measuring step 5 failed: RuntimeError: boom" in result.skipped["step_000005.pt"]


def test_a_loss_failing_before_any_checkpoint_is_measured_stops_the_scan(trained, tmp_path):
    calls = []

    def bad_loss(model, batch):
        calls.append(1)
        raise RuntimeError("boom")

    with pytest.raises(
        ValueError,
        match=r"step_000000.pt: measuring step 0 failed: RuntimeError: boom; the scan stopped "
        r"here, before measuring any checkpoint: .* same for all 5",
    ):
        quiet_scan(trained[0], probes=[LayerNorms()], run_dir=tmp_path / "s", loss_fn=bad_loss)
    assert len(calls) == 1  # not once per checkpoint


def test_checkpoints_that_all_misfit_the_model_stop_at_the_second(trained, tmp_path):
    def wider():
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    with pytest.raises(
        ValueError,
        match=r"step_000000.pt: does not fit the model .*; step_000005.pt failed the same way, "
        r"so the scan stopped instead of listing this for each of the 5 checkpoints: check that "
        r"--model builds",
    ):
        quiet_scan(trained[0], model_fn=wider, probes=[LayerNorms()], run_dir=tmp_path / "s")


def test_cli_scan_exits_2_and_names_a_repeating_failure_once(trained, tmp_path, capsys):
    user = tmp_path / "user_scan_losses.py"
    user.write_text(textwrap.dedent(USER_MODULE) + "\ndef loss(model, batch):\n    1 / 0\n")
    argv = [str(trained[0]), "--probes", "norms", "--out", str(tmp_path / "run")]
    for option, name in (("--model", "build_model"), ("--data", "batches"), ("--loss", "loss")):
        argv += [option, f"{user}:{name}"]
    assert cli_scan.run(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.count("ZeroDivisionError") == 1
    assert "trainprobe scan: error: step_000000.pt: measuring step 0 failed" in err


def test_scan_arguments_are_checked(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist or is not a directory"):
        quiet_scan(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no checkpoint files"):
        quiet_scan(tmp_path)
    with pytest.raises(TypeError, match=r"model_fn\(\) must return an nn.Module, got int"):
        quiet_scan(trained[0], model_fn=lambda: 3)
    with pytest.raises(TypeError, match=r"scan: data_fn must be callable, got int"):
        quiet_scan(trained[0], data_fn=3)
    with pytest.raises(ValueError, match=r"unknown probe 'nope'; choose from: .*hessian"):
        quiet_scan(trained[0], probes=["nope"])
    with pytest.raises(ValueError, match=r"probe 'norms' is listed twice"):
        probes_from_names(["norms", "norms"])
    with pytest.raises(ValueError, match=r"probe 'heldout' needs options that --probes cannot"):
        probes_from_names(["heldout"])
    clash = CheckpointUpdate()
    with pytest.raises(ValueError, match=r"'scan' is reserved"):
        split_probes([clash], has_optimizer=False)


def test_first_batch():
    x = torch.zeros(2)
    assert first_batch(x) is x and first_batch([x, x]) == [x, x]
    assert first_batch(iter([(x, 1), (x, 2)])) == (x, 1)
    with pytest.raises(ValueError, match=r"data_fn\(\) returned None"):
        first_batch(None)
    with pytest.raises(ValueError, match=r"returned an empty iterable"):
        first_batch(iter([]))
    y = torch.ones(2)
    assert first_batch([(x, y), (y, x)]) == (x, y)  # a list of batches: the first
    assert first_batch([{"x": x}, {"x": y}]) == {"x": x}
    assert first_batch([[x, y], [y, x]]) == [x, y]
    assert first_batch([(x, x), y]) == [(x, x), y]  # not all batches: one batch
    with pytest.raises(ValueError, match=r"returned an empty list; return a batch or a list"):
        first_batch([])


def test_data_as_a_list_of_batches(trained, tmp_path):
    def batches():
        x, y = make_batch()
        return [(x, y), (x[:5] * 100, y[:5])]

    listed = quiet_scan(trained[0], probes=[LayerNorms()], run_dir=tmp_path / "a", data_fn=batches)
    single = quiet_scan(trained[0], probes=[LayerNorms()], run_dir=tmp_path / "b")
    assert listed.ok and listed.scanned == (0, 5, 10, 15, 20)
    with trainprobe.Run(listed.run_dir) as a, trainprobe.Run(single.run_dir) as b:
        assert a.series("scalars/loss").values.tolist() == b.series("scalars/loss").values.tolist()


def test_cli_scan_imports_a_module_of_the_current_directory(trained, tmp_path, monkeypatch):
    (tmp_path / "here_scan_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)  # a console script's sys.path holds its bin folder, not this
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    args = parse(
        str(trained[0]),
        "--model",
        "here_scan_models:build_model",
        "--data",
        "here_scan_models:batches",
        "--probes",
        "norms",
        "--out",
        str(tmp_path / "run"),
    )
    assert cli_scan.run(args) == 0


USER_MODULE = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 3))

def batches():
    g = torch.Generator().manual_seed(3)
    yield torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)

NOT_A_FUNCTION = 3
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainprobe")
    cli_scan.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["scan", *argv])


def test_cli_scan(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "user_scan_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = parse(
        str(trained[0]),
        "--model",
        "user_scan_models:build_model",
        "--data",
        "user_scan_models:batches",
        "--probes",
        "norms,hessian",
        "--out",
        str(tmp_path / "run"),
    )
    assert args.func is cli_scan.run and cli_scan.run(args) == 0
    out = capsys.readouterr().out
    assert "scanned 5 checkpoint(s)" in out and "trainprobe report" in out
    with trainprobe.Run(tmp_path / "run") as run:
        assert "hessian/eig_0" in run and "regions/train/total" not in run
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "step_0.pt").write_bytes((trained[0] / "step_000000.pt").read_bytes())
    (ckpts / "step_1.pt").write_bytes(b"truncated")
    file_spec = f"{tmp_path / 'user_scan_models.py'}:"
    code = cli_scan.run(
        parse(
            str(ckpts),
            "--model",
            file_spec + "build_model",
            "--data",
            file_spec + "batches",
            "--threads",
            "1",
        )
    )
    assert code == 1
    out = capsys.readouterr().out
    assert "skipped 1 checkpoint(s):" in out and "step_1.pt: unreadable" in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("user_scan_models", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("missing/file.py:f", "cannot import 'missing/file.py'.*FileNotFoundError"),
        ("user_scan_models:nope", "'user_scan_models' has no callable 'nope'"),
        ("user_scan_models:NOT_A_FUNCTION", ".* has no callable 'NOT_A_FUNCTION' \\(it is a int"),
    ],
)
def test_import_function_errors(spec, message, tmp_path, monkeypatch):
    (tmp_path / "user_scan_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=f"--model '{spec}': {message}"):
        cli_scan.import_function(spec, "--model")


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    args = parse(str(tmp_path), "--model", "x", "--data", "y:z")
    assert cli_scan.run(args) == 2
    assert (
        "trainprobe scan: error: --model 'x': expected MODULE:FUNCTION" in capsys.readouterr().err
    )


def test_import_function_file_that_is_not_a_module(tmp_path, monkeypatch):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    return 1\n")
    assert cli_scan.import_function(f"{path}:f")() == 1
    monkeypatch.setattr(cli_scan.importlib.util, "spec_from_file_location", lambda *a: None)
    with pytest.raises(ValueError, match=r"cannot import .*ImportError: cannot load"):
        cli_scan.import_function(f"{path}:f")


def test_cli_threads_must_not_be_negative(capsys):
    with pytest.raises(SystemExit):
        parse("d", "--model", "a:b", "--data", "c:d", "--threads", "-1")
    assert "expected 0 or more, got -1" in capsys.readouterr().err


def test_the_step_prefers_a_labelled_file_name_to_an_epoch_entry(tmp_path):
    """Several checkpoints per epoch: ``epoch`` would make them collide."""
    from trainprobe.scan.checkpoints import load_checkpoint

    weights = {"w": torch.zeros(2)}
    cases = {
        "ckpt_epoch0_step500.pt": ({"model": weights, "epoch": 0}, 500),
        "ckpt_epoch0_step1000.pt": ({"model": weights, "epoch": 0}, 1000),
        "step500_seed42.pt": (weights, 500),
        "epoch_3.pt": ({"model": weights, "epoch": 3}, 3),
        "ckpt_7.pt": ({"model": weights, "global_step": 70, "epoch": 1}, 70),
        "ckpt_000200.pt": (weights, 200),
    }
    for name, (content, step) in cases.items():
        torch.save(content, tmp_path / name)
        assert load_checkpoint(tmp_path / name).step == step, name


def test_safetensors_checkpoints_are_read_and_a_broken_one_is_named(tmp_path):
    """Needs the optional safetensors package (``pip install safetensors``)."""
    st = pytest.importorskip("safetensors.torch")
    from trainprobe.scan.checkpoints import CheckpointError, load_checkpoint

    weights = {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.ones(2)}
    st.save_file(weights, str(tmp_path / "step_300.safetensors"))
    loaded = load_checkpoint(tmp_path / "step_300.safetensors")
    assert loaded.step == 300 and loaded.optimizer_state is None
    for name, tensor in weights.items():
        assert torch.equal(loaded.weights[name], tensor)
    (tmp_path / "step_400.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match=r"step_400\.safetensors: unreadable safetensors"):
        load_checkpoint(tmp_path / "step_400.safetensors")


def test_lazy_load_maps_zip_files_and_reads_legacy_ones_whole(tmp_path):
    """The scan's index pass (lazy) finds the same step and weights without reading the
    tensors of a zip-format file; a legacy (pre-zip) file cannot be mapped and is read."""
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    torch.save({"model": weights, "step": 70}, tmp_path / "zip.pt")
    torch.save(
        {"model": weights, "step": 80}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False
    )
    for name, step in (("zip.pt", 70), ("legacy.pt", 80)):
        lazy = load_checkpoint(tmp_path / name, lazy=True)
        full = load_checkpoint(tmp_path / name)
        assert lazy.step == full.step == step
        assert set(lazy.weights) == set(full.weights) == {"w", "b"}
        for key in weights:
            torch.testing.assert_close(lazy.weights[key], full.weights[key])
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", spy)
        load_checkpoint(tmp_path / "zip.pt", lazy=True)
        load_checkpoint(tmp_path / "legacy.pt", lazy=True)
        load_checkpoint(tmp_path / "zip.pt")
    assert seen == [True, False, False]  # mapped only where it can be, and only when lazy
    (tmp_path / "cut.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.pt: unreadable or truncated"):
        load_checkpoint(tmp_path / "cut.pt", lazy=True)


def test_the_dashboard_of_a_scan_draws_every_key_on_a_row_of_its_own(trained, tmp_path):
    """The scan's own keys (the change between checkpoints) have dedicated rows, not only
    the catch-all; the change row's hover carries the steps between checkpoints."""
    from trainprobe.dashboard import PANELS

    ckpts, _ = trained
    result = quiet_scan(ckpts, run_dir=tmp_path / "scan")
    with trainprobe.Run(result.run_dir) as run:
        parts = {p.name: part for p in PANELS if (part := p.draw(run, ())) is not None}
        keys = run.keys("")
    dedicated = {k for name, part in parts.items() if name != "other_series" for k in part.keys}
    assert [k for k in keys if k.startswith("scan/") and k not in dedicated] == []
    needs = [p for panel in PANELS for p in panel.needs if p.startswith("scan/")]
    assert needs and all(any(fnmatch.fnmatchcase(k, p) for k in keys) for p in needs)
    (change,) = parts["checkpoint_change"].traces
    assert "over %{customdata[1]:.0f} steps" in change.hovertemplate
    np.testing.assert_array_equal(np.asarray(change.customdata)[:, 1], [5, 5, 5, 5])
    assert len(parts["checkpoint_update_heatmap"].traces[0].y) == 4  # two weights, two biases
