"""trainprobe inside Lightning's ``Trainer.fit``: :class:`TrainprobeCallback`.

Lightning's events, and the ``watch``/``mon.step`` calls they make (checked with lightning 2.6):

- ``on_fit_start``: ``watch(pl_module, probes, optimizer=trainer.optimizers[0], ...)`` opens;
- ``on_train_batch_start`` of an optimizer step's first micro-batch:
  ``mon.step(trainer.global_step, batch=batch)`` is entered (``batch`` on the device);
- ``on_before_optimizer_step``: the block is left; the gradient probes measure. Lightning
  calls it once per optimizer step, inside the closure after every micro-batch's backward
  (``accumulate_grad_batches`` of them) and *before* clipping:
  ``lightning/pytorch/plugins/precision/precision.py``, ``Precision._after_closure``
  (lines 87-89 in 2.6.6) calls this hook, then ``_clip_gradients``; with fp16 AMP,
  ``plugins/precision/amp.py`` line 88 unscales the gradients just before. So the probes
  read the accumulated, unscaled, pre-clip gradient; update probes read the optimizer's
  step when the next block is entered;
- ``on_train_batch_end``: the step's training loss (the sum of the micro-batches' losses,
  each divided by ``accumulate_grad_batches`` as Lightning does) goes in as ``scalars/loss``;
- ``on_fit_end`` (or ``teardown``): the monitor closes, ``finished``; ``on_exception``: it
  closes ``failed: <error>``, every hook removed.

The probes' ``batch`` is the first micro-batch of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..monitor import Monitor, StepHandle
from ..probes.base import Probe
from . import close_monitor, end_step, open_monitor

try:
    import lightning
    from lightning.pytorch import Callback
except ImportError:  # the extra is missing: making the callback says how to install it

    class Callback:  # type: ignore[no-redef]
        def __init__(self) -> None:
            raise ImportError(
                "trainprobe.integrations.lightning needs Lightning: "
                "pip install 'trainprobe[lightning]'"
            )


GRADIENT = (
    "accumulated, unscaled, pre-clip: read at Lightning's on_before_optimizer_step, which "
    "runs before configure_gradient_clipping (Precision._after_closure)"
)


class TrainprobeCallback(Callback):
    """Run trainprobe's probes on a LightningModule while ``Trainer.fit`` trains it.

    One record per optimizer step, at step ``trainer.global_step``. See the module doc.

    Args:
        probes: as :func:`trainprobe.watch` (default its default probes).
        run_dir: where the run is stored, as :func:`trainprobe.watch`.
        loss_fn: ``loss(pl_module, batch) -> scalar`` for the probes that evaluate the loss
            themselves (Hessian, sharpness), ``batch`` as the dataloader yields it.
        **watch_options: any other keyword of :func:`trainprobe.watch` (``overwrite``,
            ``meta``, ...); ``meta["integration"]`` records which gradient was measured.

    Raises:
        ImportError: Lightning is not installed.
        ValueError: (when fit starts) the module uses manual optimization.
        RuntimeError: (when a step ends) the probes cannot read the gradients: still scaled
            by fp16 AMP, or none in ``p.grad`` (DeepSpeed ZeRO); see
            :func:`trainprobe.integrations.gradient_problem`. The run closes as failed.
    """

    def __init__(
        self,
        probes: Sequence[Probe] | None = None,
        *,
        run_dir: str | Path | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        **watch_options: Any,
    ) -> None:
        super().__init__()
        self.probes, self.run_dir, self.loss_fn = probes, run_dir, loss_fn
        self.watch_options = watch_options
        self.monitor: Monitor | None = None
        self._step: StepHandle | None = None
        self._loss: Tensor | None = None  # the open or just-ended step's loss so far
        self._ended = False  # the step block ended; its loss is logged at the batch's end
        self._seen_grads = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "TrainprobeCallback follows Lightning's automatic optimization; with "
                "automatic_optimization=False use trainprobe.watch() and mon.step() in "
                "training_step around your own manual_backward and optimizer step"
            )
        self.monitor = open_monitor(
            pl_module,
            self.probes,
            run_dir=self.run_dir,
            optimizer=trainer.optimizers[0] if trainer.optimizers else None,
            loss_fn=self.loss_fn,
            options=self.watch_options,
            integration={"framework": f"lightning {lightning.__version__}", "gradient": GRADIENT},
        )

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None or self._step is not None:
            return  # a later micro-batch of the open step
        self._loss, self._ended = None, False
        self._step = self.monitor.step(trainer.global_step, batch=batch)
        self._step.__enter__()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor is None or self._step is None:
            return
        handle, self._step = self._step, None
        self._ended = True
        self._seen_grads = end_step(
            handle,
            self.monitor.params,
            event="Lightning's on_before_optimizer_step",
            seen_grads=self._seen_grads,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            optimizer=optimizer,
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach()
            self._loss = loss if self._loss is None else self._loss + loss
        if self.monitor is not None and self._ended and self._loss is not None:
            self.monitor.log(loss=self._loss)
            self._loss, self._ended = None, False

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close(exception)

    def close(self, error: BaseException | None = None) -> None:
        """Close the monitor (idempotent): ``finished``, or ``failed`` with ``error``; an
        open step block is left as failed and every hook is removed."""
        monitor, self.monitor, self._step = self.monitor, None, None
        close_monitor(monitor, error)
