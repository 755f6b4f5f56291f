""":func:`watch`: the entry point that makes a :class:`~.monitor.Monitor`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..probes.base import Probe
from .monitor import Monitor


def watch(
    model: nn.Module,
    probes: Sequence[Probe] | None = None,
    *,
    run_dir: str | Path | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    resume: bool = False,
    resume_from: int | None = None,
    overwrite: bool = False,
    flush_seconds: float = 2.0,
    on_probe_error: str = "warn",
    meta: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    mirror: Any = None,
) -> Monitor:
    """Watch ``model`` while it trains; use as ``with watch(model, ...) as mon:``.

    Args:
        model: any ``nn.Module`` with trainable parameters.
        probes: probe instances; default :func:`trainprobe.probes.default_probes`.
        run_dir: where the run is stored (default ``runs/run-<UTC time>``).
        optimizer: lets probes read the learning rate and optimizer state.
        loss_fn: ``loss(model, batch) -> scalar``, for probes that evaluate the loss
            themselves (Hessian, sharpness): e.g.
            ``trainprobe.curvature.criterion_loss(nn.CrossEntropyLoss())``.
        resume: append to the run already in ``run_dir`` (steps must go on past its last
            stored step, or pass ``resume_from``). Refused while another live process
            still writes that run (:class:`~trainprobe.store.RunInUseError` names it).
        resume_from: with ``resume=True``, the step the resumed job continues at, e.g. a
            preempted job restarted from its step-500 checkpoint passes 500: every value
            stored at step 500 or later (what the job recorded past its checkpoint before
            it stopped) is deleted when the monitor opens, in one transaction, and logged
            in the run's metadata as ``truncated``; so no step holds two values of a key.
        overwrite: delete the run already in ``run_dir`` and start a new one there (the
            run's database only; other files in the directory stay).
        flush_seconds: values are buffered on the device and committed when a step ends
            (or, for a step with an update probe due, when the next step begins) once this
            long has passed since the last commit; 0 commits every step as it ends. A
            process killed in between loses only the buffered steps.
        on_probe_error: ``"warn"`` disables a probe that raises (training goes on);
            ``"raise"`` propagates the error.
        meta: extra JSON-serialisable metadata stored with the run (config, seed, ...).
        scaler: the ``torch.amp.GradScaler`` of fp16 training. Gradient probes then read
            the true gradient (``.grad`` times ``1 / scale`` until ``scaler.unscale_``; no
            sync), and :class:`~trainprobe.probes.LossScale` records the scale and the
            steps the scaler skipped (added when the probes do not include one).
        mirror: trackers that get a copy of every value committed to the store (probe
            values and ``scalars/*``, at each flush, from the host values already moved:
            no extra sync) and, when the monitor closes, the findings of
            :func:`trainprobe.analyze`: a ``torch.utils.tensorboard.SummaryWriter``
            (``add_scalar``; arrays as histograms; findings as ``add_text``), a W&B run
            (``log``; findings in its ``summary``), a Lightning logger (``log_metrics``;
            findings by ``log_hyperparams``), an object with ``write(step, values)``
            (:class:`~trainprobe.monitor.mirror.Mirror`), or a list of these. The store
            stays the record: a tracker that raises is warned about once and left out,
            and training goes on. Under ``torch.distributed``, rank 0 mirrors. The
            trackers stay open (closing them is the caller's).

    Raises:
        TypeError: ``model`` is not a module, a probe is a class or not a probe, or
            ``mirror`` is none of the trackers above.
        ValueError: no trainable parameters, duplicate probe names, bad options
            (``resume_from`` without ``resume``, ``resume`` with ``overwrite``).
        FileExistsError: on entering, ``run_dir`` already holds a run and neither
            ``resume`` nor ``overwrite`` is set.
        RunInUseError: on entering, another live process writes ``run_dir``.
        PermissionError: on entering, ``run_dir`` cannot be written.

    Examples:
        Two steps of gradient descent on ``L(w) = w²`` from ``w = 1`` with ``lr = 0.25``:
        ``w`` halves each step, so the loss goes from 1 to 0.25; at step 0 the gradient is
        2 and the update 0.5, half the weight.

        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from trainprobe import Run
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.ones_(model.weight)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.25)
        >>> folder = tempfile.TemporaryDirectory()
        >>> with watch(model, run_dir=folder.name, optimizer=opt) as mon:
        ...     for step in range(2):
        ...         with mon.step(step) as s:
        ...             loss = model(torch.ones(1, 1)).pow(2).mean()
        ...             loss.backward()
        ...             s.log(loss=loss)
        ...         opt.step()
        ...         opt.zero_grad()
        >>> with Run(folder.name) as run:
        ...     print(run.series("scalars/loss").values.tolist(),
        ...           run.series("norms/grad_total").values.tolist(),
        ...           run.series("updates/ratio_total").values.tolist())
        [1.0, 0.25] [2.0] [0.5]
        >>> folder.cleanup()
    """
    if run_dir is None:
        run_dir = Path("runs") / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    return Monitor(
        model,
        probes,
        run_dir=run_dir,
        optimizer=optimizer,
        loss_fn=loss_fn,
        resume=resume,
        resume_from=resume_from,
        overwrite=overwrite,
        flush_seconds=flush_seconds,
        on_probe_error=on_probe_error,
        meta=meta,
        scaler=scaler,
        mirror=mirror,
    )
