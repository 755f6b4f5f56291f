"""The HF Trainer callback, with the real transformers and accelerate, against the plain loop
under ``watch``."""

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
    RTOL,
    STEPS,
    N,
    TinyNet,
    assert_series_agree,
    make_data,
    make_net,
    make_optimizer,
    make_probes,
    plain_run,
)
from trainprobe import ActivationStats, LayerNorms, Run, every

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from torch.amp import GradScaler  # noqa: E402

from trainprobe.integrations.hf import TrainprobeCallback  # noqa: E402


class Examples(torch.utils.data.IterableDataset):
    """The examples in order, cycled: the Trainer reads an iterable dataset as it comes, with
    no sampler, in every transformers version (so no shuffling, as in the plain loop)."""

    def __iter__(self):
        x, y = make_data()
        for i in range(STEPS * 4 * BATCH):
            yield {"x": x[i % N], "labels": y[i % N]}


def train(model, callback, tmp_path: Path, *, trainer_class=None, **args):
    options = {
        "per_device_train_batch_size": BATCH,
        "max_steps": STEPS,
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **options | args)
    trainer = (trainer_class or transformers.Trainer)(
        model=model,
        args=arguments,
        train_dataset=Examples(),
        optimizers=(make_optimizer(model.parameters()), None),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def hf_run(tmp_path: Path, **args) -> Run:
    run_dir = tmp_path / "hf"
    train(make_net(), TrainprobeCallback(make_probes(), run_dir=run_dir), tmp_path, **args)
    return Run(run_dir)


def test_hf_series_agree_with_the_plain_loop(tmp_path):
    run = hf_run(tmp_path)
    reference = plain_run(tmp_path / "plain")
    worst = assert_series_agree(run, reference)
    assert len(run.series("norms/grad_total").steps) == STEPS
    assert len(run.series("sharpness/lambda_max").steps) == STEPS // 2
    assert_series_agree(run, reference, keys=("scalars/loss",))
    if "scalars/grad_norm_preclip" in run:  # logged without clipping since transformers 5.x
        # the trainer's own pre-clip norm (unclipped here) is the probes' gradient norm
        np.testing.assert_allclose(
            run.series("scalars/grad_norm_preclip").values,
            reference.series("norms/grad_total").values,
            rtol=RTOL,
        )
    assert run.meta["status"] == "finished"
    assert "unclipped" in run.meta["user"]["integration"]["gradient"]
    print("hf vs plain, largest relative difference:", worst)


def test_accumulation_gives_one_record_per_optimizer_step(tmp_path):
    run = hf_run(tmp_path, gradient_accumulation_steps=2)
    reference = plain_run(tmp_path / "plain", accumulate=2)
    assert run.series("norms/grad_total").steps.tolist() == list(range(STEPS))
    assert_series_agree(run, reference, keys=("norms/grad_total", "scalars/loss"))
    assert_series_agree(run, reference)


def test_gradient_probes_read_the_post_clip_gradient_and_the_pre_clip_norm_is_kept(tmp_path):
    clip = 0.01
    run = hf_run(tmp_path, max_grad_norm=clip)
    reference = plain_run(tmp_path / "plain", clip=clip)  # measured before clipping
    pre = reference.series("norms/grad_total").values
    assert pre.min() > 10 * clip
    np.testing.assert_allclose(run.series("scalars/grad_norm_preclip").values, pre, rtol=RTOL)
    np.testing.assert_allclose(run.series("norms/grad_total").values, clip, rtol=1e-4)
    assert_series_agree(run, reference, keys=("norms/weight_total", "updates/ratio_total"))
    assert "post-clip" in run.meta["user"]["integration"]["gradient"]


class FailingNet(TinyNet):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x, labels=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom in forward")
        return super().forward(x, labels)


def test_a_raising_forward_removes_hooks_and_fails_the_run(tmp_path):
    model = FailingNet(fail_at=4)
    probes = [ActivationStats(schedule=every(1)), LayerNorms(schedule=every(1))]
    with pytest.raises(RuntimeError, match="boom in forward"):
        with TrainprobeCallback(probes, run_dir=tmp_path / "run") as callback:
            train(model, callback, tmp_path)
    assert hook_count(model) == 0
    run = Run(tmp_path / "run")
    assert run.meta["status"].startswith("failed: RuntimeError: boom in forward")
    assert run.series("norms/grad_total").steps.tolist() == [0, 1, 2]


def test_still_scaled_fp16_gradients_are_refused(tmp_path):
    """The Trainer unscales before on_pre_optimizer_step (Accelerator.clip_grad_norm_, and on
    the CPU accelerate's fp16 has no scaler at all); a trainer that did not would be refused:
    the events by hand, with accelerate's optimizer wrapper and torch's GradScaler."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    Accelerator(cpu=True)  # after the arguments, which reset accelerate's state
    model = make_net()
    optimizer = AcceleratedOptimizer(make_optimizer(model.parameters()), scaler=GradScaler("cpu"))
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback = TrainprobeCallback([LayerNorms(schedule=every(1))], run_dir=tmp_path / "run")
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    x, y = make_data()
    for step in range(2):
        state.global_step = step
        callback.on_step_begin(args, state, control, model=model)
        optimizer.scaler.scale(model(x[:BATCH], y[:BATCH])["loss"]).backward()  # x 2**16
        if step == 1:
            with pytest.raises(RuntimeError, match="still multiplied by the fp16 loss scale"):
                callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
            break
        optimizer.scaler.unscale_(optimizer.optimizer)  # what Accelerator.clip_grad_norm_ does
        callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
    assert hook_count(model) == 0
    run = Run(tmp_path / "run")
    assert run.meta["status"].startswith("failed: RuntimeError: trainprobe")
    assert run.series("norms/grad_total").values[0] < 100  # step 0: unscaled, measured


class NoBackwardTrainer(transformers.Trainer):
    """Leaves ``p.grad`` empty, as DeepSpeed ZeRO does (gradients inside its engine)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.compute_loss(model, inputs).detach()


def test_gradients_outside_p_grad_are_refused(tmp_path):
    callback = TrainprobeCallback([LayerNorms(schedule=every(1))], run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"no parameter holds a \.grad .*DeepSpeed ZeRO"):
        train(make_net(), callback, tmp_path, trainer_class=NoBackwardTrainer)
    assert Run(tmp_path / "run").meta["status"].startswith("failed")  # without `with`


def test_without_transformers_the_callback_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    path = Path(__file__).parents[2] / "src" / "trainprobe" / "integrations" / "hf.py"
    spec = importlib.util.spec_from_file_location("trainprobe.integrations._no_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match=r"pip install 'trainprobe\[hf\]'"):
        module.TrainprobeCallback()


def test_the_default_loss_is_the_models(tmp_path):
    x, y = make_data()
    model = make_net()
    from trainprobe.integrations.hf import model_loss

    want = model(x, y)["loss"]
    assert torch.equal(model_loss(model, {"x": x, "labels": y}), want)
