"""The Lightning callback, with the real Lightning, against the plain loop under ``watch``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cases import hook_count
from tests.integrations import (
    BATCH,
    STEPS,
    TinyNet,
    assert_series_agree,
    make_data,
    make_net,
    make_optimizer,
    make_probes,
    pair_loss,
    plain_run,
)
from trainprobe import ActivationStats, LayerNorms, Run, every

L = pytest.importorskip("lightning")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from trainprobe.integrations.lightning import TrainprobeCallback  # noqa: E402


class LitNet(L.LightningModule):
    def __init__(self, net: TinyNet, *, fail_at: int | None = None, fused: bool = False):
        super().__init__()
        self.net, self.fail_at, self.fused = net, fail_at, fused

    def forward(self, x, labels=None):
        return self.net(x, labels)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in training_step")
        return pair_loss(self, batch)

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)
        return make_optimizer(self.parameters())


def fit(module, callback, tmp_path: Path, *, steps: int = STEPS, **trainer_options):
    x, y = make_data()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[callback],
        **trainer_options,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    trainer.fit(module, loader)
    return trainer


def lightning_run(tmp_path: Path, **trainer_options) -> Run:
    run_dir = tmp_path / "lightning"
    callback = TrainprobeCallback(make_probes(), run_dir=run_dir, loss_fn=pair_loss)
    fit(LitNet(make_net()), callback, tmp_path, **trainer_options)
    return Run(run_dir)


def test_lightning_series_agree_with_the_plain_loop(tmp_path):
    run = lightning_run(tmp_path)
    reference = plain_run(tmp_path / "plain")
    worst = assert_series_agree(run, reference)
    assert len(run.series("norms/grad_total").steps) == STEPS
    assert len(run.series("sharpness/lambda_max").steps) == STEPS // 2
    assert_series_agree(run, reference, keys=("scalars/loss",))
    assert run.meta["status"] == "finished"
    assert "pre-clip" in run.meta["user"]["integration"]["gradient"]
    print("lightning vs plain, largest relative difference:", worst)


def test_accumulation_gives_one_record_per_optimizer_step(tmp_path):
    run = lightning_run(tmp_path, accumulate_grad_batches=2)
    reference = plain_run(tmp_path / "plain", accumulate=2)
    assert run.series("norms/grad_total").steps.tolist() == list(range(STEPS))
    # the accumulated gradient (mean over 2 micro-batches), and the step's mean loss
    assert_series_agree(run, reference, keys=("norms/grad_total", "scalars/loss"))
    assert_series_agree(run, reference)
    single = plain_run(tmp_path / "single")  # one micro-batch a step: another gradient
    assert not np.allclose(
        run.series("norms/grad_total").values[1:], single.series("norms/grad_total").values[1:]
    )


def test_gradient_probes_read_the_pre_clip_gradient(tmp_path):
    clip = 0.01
    run = lightning_run(tmp_path, gradient_clip_val=clip)
    reference = plain_run(tmp_path / "plain", clip=clip)  # measured before clipping
    assert_series_agree(run, reference)
    assert run.series("norms/grad_total").values.min() > 10 * clip


def test_a_raising_training_step_removes_hooks_and_fails_the_run(tmp_path):
    module = LitNet(make_net(), fail_at=3)
    probes = [ActivationStats(schedule=every(1)), LayerNorms(schedule=every(1))]
    callback = TrainprobeCallback(probes, run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom in training_step"):
        fit(module, callback, tmp_path)
    assert hook_count(module) == 0
    run = Run(tmp_path / "run")
    assert run.meta["status"].startswith("failed: RuntimeError: boom in training_step")
    assert run.series("norms/grad_total").steps.tolist() == [0, 1, 2]


def test_still_scaled_fp16_gradients_are_refused(tmp_path):
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = LitNet(make_net(), fused=True)  # fused Adam unscales inside its step()
    callback = TrainprobeCallback([LayerNorms(schedule=every(1))], run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="still multiplied by the fp16 loss scale"):
        fit(module, callback, tmp_path, plugins=[precision])
    assert Run(tmp_path / "run").meta["status"].startswith("failed: RuntimeError: trainprobe")


def test_fp16_gradients_unscaled_by_lightning_are_read(tmp_path):
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    callback = TrainprobeCallback([LayerNorms(schedule=every(1))], run_dir=tmp_path / "run")
    fit(LitNet(make_net()), callback, tmp_path, plugins=[precision], steps=2)
    run = Run(tmp_path / "run")
    assert run.meta["status"] == "finished"
    # unscaled: the size of an fp32 gradient, not 2**16 times it
    assert run.series("norms/grad_total").values.max() < 100


class NoGradNet(LitNet):
    """Its backward leaves ``p.grad`` empty, as DeepSpeed ZeRO does (gradients in its engine)."""

    def backward(self, loss, *args, **kwargs):
        loss.detach()


def test_gradients_outside_p_grad_are_refused(tmp_path):
    callback = TrainprobeCallback([LayerNorms(schedule=every(1))], run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"no parameter holds a \.grad .*DeepSpeed ZeRO"):
        fit(NoGradNet(make_net()), callback, tmp_path)
    assert Run(tmp_path / "run").meta["status"].startswith("failed")


class ManualNet(LitNet):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False


def test_manual_optimization_is_refused(tmp_path):
    callback = TrainprobeCallback(run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="automatic optimization"):
        fit(ManualNet(make_net()), callback, tmp_path)


def test_without_lightning_the_callback_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning` fails
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    path = Path(__file__).parents[2] / "src" / "trainprobe" / "integrations" / "lightning.py"
    spec = importlib.util.spec_from_file_location("trainprobe.integrations._no_lightning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match=r"pip install 'trainprobe\[lightning\]'"):
        module.TrainprobeCallback()
