"""trainprobe inside the Hugging Face ``Trainer``: :class:`TrainprobeCallback`.

The Trainer's events, and the ``watch``/``mon.step`` calls they make (checked with
transformers 5.0 and 5.25):

- ``on_train_begin``: ``watch(model, probes, optimizer=<the torch optimizer>, ...)`` opens;
- ``on_step_begin`` (once per optimizer step, before the first micro-batch):
  ``mon.step(state.global_step, batch=inputs)`` is entered, where ``inputs`` is filled, by a
  forward pre-hook held for the block, with the keyword inputs of the step's first forward;
- ``on_pre_optimizer_step``: the block is left; the gradient probes measure. No event runs
  between the last micro-batch's backward and clipping: in ``transformers/trainer.py``
  (5.25: lines 1974-1979, ``_clip_grad_norm`` when ``max_grad_norm > 0``, then
  ``_get_grad_norm``; 5.0: lines 2559-2582, clipping when ``max_grad_norm > 0``) the
  Trainer calls ``Accelerator.clip_grad_norm_``, which unscales fp16 gradients first, then
  this event. So the probes read the accumulated gradient *after* clipping; the pre-clip
  norm the Trainer returns is logged as ``grad_norm`` and stored here as
  ``scalars/grad_norm_preclip`` at the steps the Trainer logs (``logging_steps``), with its
  logged (interval-mean) loss as ``scalars/loss``. (In 5.0 with ``max_grad_norm=0`` nothing
  unscales fp16 gradients before this event: the callback refuses them, see
  :func:`~trainprobe.integrations.gradient_problem`.)
- ``on_train_end``: the monitor closes, ``finished``. The Trainer has no event for an error:
  use the callback as a context manager around ``trainer.train()`` so that an error closes
  the run ``failed: <error>`` and removes every hook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..monitor import Monitor, StepHandle
from ..probes.base import Probe
from . import close_monitor, end_step, open_monitor

try:
    import transformers
    from transformers import TrainerCallback
except ImportError:  # the extra is missing: making the callback says how to install it

    class TrainerCallback:  # type: ignore[no-redef]
        def __init__(self) -> None:
            raise ImportError(
                "trainprobe.integrations.hf needs transformers and accelerate: "
                "pip install 'trainprobe[hf]'"
            )


def model_loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """The loss the Trainer trains on: ``model(**inputs)["loss"]`` (the default ``loss_fn``)."""
    return model(**inputs)["loss"]


def _keep_inputs(inputs: dict[str, Any], module: nn.Module, args: tuple, kwargs: dict) -> None:
    if not inputs:  # the first micro-batch of the step
        inputs.update(kwargs)


class TrainprobeCallback(TrainerCallback):
    """Run trainprobe's probes on the model a Hugging Face ``Trainer`` trains.

    One record per optimizer step, at step ``state.global_step``. See the module doc.

    Args:
        probes: as :func:`trainprobe.watch` (default its default probes).
        run_dir: where the run is stored, as :func:`trainprobe.watch`.
        loss_fn: ``loss(model, inputs) -> scalar`` for the probes that evaluate the loss
            themselves (Hessian, sharpness); ``inputs`` is the dict of the step's first
            forward; default :func:`model_loss`.
        **watch_options: any other keyword of :func:`trainprobe.watch` (``overwrite``,
            ``meta``, ...); ``meta["integration"]`` records which gradient was measured.

    Raises:
        ImportError: transformers is not installed.
        RuntimeError: (when a step ends) the probes cannot read the gradients: still scaled
            by fp16 AMP, or none in ``p.grad`` (DeepSpeed ZeRO); see
            :func:`trainprobe.integrations.gradient_problem`. The run closes as failed.
    """

    def __init__(
        self,
        probes: Sequence[Probe] | None = None,
        *,
        run_dir: str | Path | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = model_loss,
        **watch_options: Any,
    ) -> None:
        super().__init__()
        self.probes, self.run_dir, self.loss_fn = probes, run_dir, loss_fn
        self.watch_options = watch_options
        self.monitor: Monitor | None = None
        self._step: StepHandle | None = None
        self._keep: RemovableHandle | None = None  # the forward pre-hook of the open step
        self._ended = False  # a step ended and nothing began since: logs go into it
        self._seen_grads = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        clip = args.max_grad_norm
        gradient = (
            f"accumulated, unscaled, post-clip (max_grad_norm={clip}): read at "
            "on_pre_optimizer_step, after the Trainer clips; the pre-clip norm is "
            "scalars/grad_norm_preclip at its logging steps"
            if clip and clip > 0
            else "accumulated, unscaled, unclipped (max_grad_norm=0)"
        )
        optimizer = kwargs.get("optimizer")
        self.monitor = open_monitor(
            kwargs["model"],
            self.probes,
            run_dir=self.run_dir,
            optimizer=getattr(optimizer, "optimizer", optimizer),  # accelerate wraps it
            loss_fn=self.loss_fn,
            options=self.watch_options,
            integration={
                "framework": f"transformers {transformers.__version__}",
                "gradient": gradient,
            },
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        inputs: dict[str, Any] = {}
        self._ended = False
        self._step = self.monitor.step(state.global_step, batch=inputs)
        self._step.__enter__()
        self._keep = kwargs["model"].register_forward_pre_hook(
            partial(_keep_inputs, inputs), with_kwargs=True
        )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None or self._step is None:
            return
        handle, self._step = self._step, None
        self._remove_keep()
        self._ended = True
        optimizer = kwargs.get("optimizer")
        try:
            self._seen_grads = end_step(
                handle,
                self.monitor.params,
                event="the HF Trainer's on_pre_optimizer_step",
                seen_grads=self._seen_grads,
                scaler=getattr(optimizer, "scaler", None),
                optimizer=getattr(optimizer, "optimizer", optimizer),
            )
        except RuntimeError as error:  # no event follows an error: the run closes now
            self.close(error)
            raise

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.monitor is None or not self._ended or not logs:
            return
        values = {"loss": logs.get("loss"), "grad_norm_preclip": logs.get("grad_norm")}
        values = {k: v for k, v in values.items() if isinstance(v, float | Tensor)}
        if values:
            self.monitor.log(**values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Close the monitor (idempotent): ``finished``, or ``failed`` with ``error``; an
        open step block is left as failed and every hook is removed."""
        self._remove_keep()
        monitor, self.monitor, self._step = self.monitor, None, None
        close_monitor(monitor, error)

    def _remove_keep(self) -> None:
        if self._keep is not None:
            self._keep.remove()
            self._keep = None

    def __enter__(self) -> TrainprobeCallback:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        self.close(error)
