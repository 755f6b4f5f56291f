"""Run the live probes on a directory of saved checkpoints, into the same run store.

Data flow (DESIGN.md): checkpoints -> the same :class:`~trainprobe.monitor.Monitor`
(one ``mon.step`` per checkpoint, its weights loaded first) -> the same probes -> the
same store, so ``trainprobe report`` and ``trainprobe dashboard`` read a scanned run
as they read a live one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature import criterion_loss
from ..monitor import Monitor, watch
from ..probes.base import Probe
from ..progress import Progress
from ..store import Run
from ..store.schema import DB_NAME
from .checkpoints import (
    CheckpointError,
    check_weights,
    find_checkpoint_files,
    load_checkpoint,
)
from .probes import default_scan_probes, probes_from_names, split_probes
from .setup import first_batch, stop_if_repeating
from .update import CheckpointUpdate

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class ScanResult:
    """What a scan did.

    Attributes:
        run_dir: the run the measurements went to.
        scanned: steps measured by this scan, increasing.
        already: steps of checkpoints already in the run (an earlier scan), not redone.
        skipped: ``{file name: reason}`` for checkpoints that were not measured.
        left_out: ``{probe name: reason}`` for probes that did not run (what the
            checkpoints lack, or the probe failed and the monitor disabled it).
    """

    run_dir: Path
    scanned: tuple[int, ...]
    already: tuple[int, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)
    left_out: Mapping[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        """How many checkpoint files were skipped (unreadable, mismatched, refused, failed)."""
        return len(self.skipped)

    @property
    def ok(self) -> bool:
        """True when every checkpoint file was measured (now or by an earlier scan)."""
        return not self.skipped


def scan(
    ckpt_dir: str | Path,
    *,
    model_fn: Callable[[], nn.Module],
    data_fn: Callable[[], Any],
    probes: Sequence[Probe | str] | None = None,
    run_dir: str | Path | None = None,
    loss_fn: LossFn | None = None,
    optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    trust_checkpoints: bool = False,
    train_mode: bool = False,
    progress: bool = True,
) -> ScanResult:
    """Measure every checkpoint in ``ckpt_dir`` with the live probes, in step order.

    For each checkpoint (see :mod:`trainprobe.scan.checkpoints` for the formats and
    how the step is found) the weights are loaded into ``model_fn()``'s model and one
    step is observed through a real :func:`trainprobe.watch` monitor: inside the step
    block the loss on the scan's batch is computed and back-propagated (so gradient
    probes see ``.grad``, and ``scalars/loss`` is recorded), exactly where a training
    loop would. The batch is the first one ``data_fn()`` gives (``data_fn()`` may
    return one batch, a list of batches, or an iterable of batches such as a DataLoader;
    see :func:`first_batch`): the same fixed batch at every checkpoint, so the
    measurements differ only by the weights.

    A checkpoint that cannot be read or does not fit the model is skipped with its
    reason. But while nothing has been measured yet, a failure that would repeat at
    every checkpoint stops the scan with a ``ValueError`` naming it once: the model or
    the loss raising on the first checkpoint (the batch, model and loss are the same
    for every one; only the weights change), or two checkpoints failing with the same
    reason (e.g. neither fits the model ``model_fn`` builds).

    The change of the weights between consecutive checkpoints is recorded as
    ``scan/update_*`` (:class:`~trainprobe.scan.update.CheckpointUpdate`); probes that
    need one optimizer step's update (``updates``) are left out, and probes that need
    the optimizer run only with ``optimizer_fn`` and an optimizer state in the files.

    Resumable: when ``run_dir`` already holds a run, checkpoints whose step is at or
    before its last step are not measured again; newer ones are appended.

    Args:
        ckpt_dir: directory holding ``.pt``/``.pth``/``.bin``/``.safetensors`` files.
        model_fn: builds the model the checkpoints were saved from (no arguments).
        data_fn: returns the batch to evaluate on (e.g. ``(inputs, targets)``).
        probes: probe instances or :data:`~trainprobe.probes.PROBES` names; default
            :func:`~trainprobe.scan.probes.default_scan_probes` (norms, Hessian top
            eigenvalue, local complexity). Names are built due at every checkpoint;
            instances keep their own schedule, evaluated at the checkpoint steps.
        run_dir: where the run is stored (default ``ckpt_dir/trainprobe-scan``).
        loss_fn: ``loss(model, batch) -> scalar``; default cross-entropy on
            ``(inputs, targets)``.
        optimizer_fn: ``optimizer_fn(model) -> optimizer``, loaded with each
            checkpoint's optimizer state when it holds one.
        trust_checkpoints: allow unpickling whole saved models (runs code from the files).
        train_mode: evaluate in train mode (dropout on, BatchNorm batch statistics);
            default eval mode, which makes a scan deterministic.
        progress: draw a progress bar with the current checkpoint on stderr.

    Raises:
        FileNotFoundError: ``ckpt_dir`` is not a directory.
        ValueError: no checkpoint files, unknown probe names, ``data_fn`` gives no batch,
            or the scan stopped at a failure that would repeat at every checkpoint.
        TypeError: ``model_fn``/``data_fn``/``loss_fn``/``optimizer_fn`` is not
            callable, or ``model_fn()`` is not an ``nn.Module``.
    """
    for name, fn in (
        ("model_fn", model_fn),
        ("data_fn", data_fn),
        ("loss_fn", loss_fn),
        ("optimizer_fn", optimizer_fn),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"scan: {name} must be callable, got {type(fn).__name__}")
    files = find_checkpoint_files(ckpt_dir)
    if not files:
        raise ValueError(
            f"no checkpoint files (.pt, .pth, .bin, .safetensors) directly in {str(ckpt_dir)!r}"
        )
    run_dir = Path(ckpt_dir) / "trainprobe-scan" if run_dir is None else Path(run_dir)
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"scan: model_fn() must return an nn.Module, got {type(model).__name__}")
    batch = first_batch(data_fn())
    optimizer = optimizer_fn(model) if optimizer_fn is not None else None
    chosen = _resolve(probes)
    runnable, left_out = split_probes(chosen, has_optimizer=optimizer is not None)

    order, skipped = _index(files, trust_checkpoints)
    recorded, last = _recorded_steps(run_dir)
    pending, already = [], []
    for step, path in order:
        if last is None or step > last:
            pending.append((step, path))
        elif step in recorded:
            already.append((step, path))
        else:
            skipped[path.name] = (
                f"{path.name}: step {step} comes before the run's last step {last}; scan into "
                "a new run directory to include it"
            )
    model.train(train_mode)
    scanned: list[int] = []
    meta = {"scan": {"checkpoint_dir": str(ckpt_dir), "train_mode": train_mode}}
    resume = (run_dir / DB_NAME).exists()
    loss_fn = loss_fn or _cross_entropy()
    with watch(model, runnable, run_dir=run_dir, resume=resume, loss_fn=loss_fn, meta=meta) as mon:
        if already:
            _seed_update(mon, model, already[-1][1], trust_checkpoints)
        with _bar(len(pending), progress) as bar:
            first_failure: tuple[str, str] | None = None
            for i, (step, path) in enumerate(pending):
                bar.update(i, path.name)
                failure = _scan_one(mon, model, optimizer, step, path, batch, trust_checkpoints)
                if failure is None:
                    scanned.append(step)
                    continue
                skipped[path.name] = failure[0]
                if not scanned:
                    first_failure = stop_if_repeating(failure, path, first_failure, len(pending))
            bar.update(len(pending), "done")
    with Run(run_dir) as run:
        left_out.update(run.meta.get("disabled_probes") or {})
    return ScanResult(run_dir, tuple(scanned), tuple(s for s, _ in already), skipped, left_out)


def _resolve(probes: Sequence[Probe | str] | None) -> list[Probe]:
    if probes is None:
        return default_scan_probes()
    names = [p for p in probes if isinstance(p, str)]
    built = iter(probes_from_names(names))
    return [next(built) if isinstance(p, str) else p for p in probes]


def _cross_entropy() -> LossFn:
    return criterion_loss(nn.CrossEntropyLoss())


def _index(files: Sequence[Path], trust: bool) -> tuple[list[tuple[int, Path]], dict[str, str]]:
    """``([(step, path)] by step, {file: reason})``: each file opened for its step; a
    zip-format file's tensors are mapped from disk, not read (``lazy``), so the measuring
    pass is the only one that reads them."""
    found: dict[int, Path] = {}
    skipped: dict[str, str] = {}
    for path in files:
        try:
            step = load_checkpoint(path, trust=trust, lazy=True).step
        except CheckpointError as err:
            skipped[path.name] = str(err)
            continue
        if step in found:
            skipped[path.name] = f"{path.name}: step {step} again (also {found[step].name})"
            continue
        found[step] = path
    return sorted(found.items()), skipped


def _recorded_steps(run_dir: Path) -> tuple[set[int], int | None]:
    """Steps an earlier scan measured (they log ``scalars/loss``) and the run's last step."""
    if not (run_dir / DB_NAME).exists():
        return set(), None
    with Run(run_dir) as run:
        steps = set(run.series("scalars/loss").steps.tolist()) if "scalars/loss" in run else set()
        return steps, run.last_step()


def _scan_one(
    mon: Monitor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    path: Path,
    batch: Any,
    trust: bool,
) -> tuple[str, bool] | None:
    """Load ``path`` and observe one step; None, or why it was skipped and whether the
    measuring itself failed (the model or the loss raised) rather than the file."""
    try:
        ckpt = load_checkpoint(path, trust=trust)
        check_weights(path, ckpt.weights, model)
        model.load_state_dict(ckpt.weights)
        step_optimizer = None
        if optimizer is not None and ckpt.optimizer_state is not None:
            try:
                optimizer.load_state_dict(ckpt.optimizer_state)
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(
                    f"{path.name}: the optimizer state does not fit optimizer_fn's optimizer "
                    f"({err})"
                ) from err
            step_optimizer = optimizer
    except CheckpointError as err:
        return str(err), False
    try:
        with mon.step(step, batch=batch, optimizer=step_optimizer) as s:
            model.zero_grad(set_to_none=True)
            loss = mon.loss_fn(model, batch)
            loss.backward()
            s.log(loss=loss)
    except Exception as err:  # the user's model or loss failed on this checkpoint
        return f"{path.name}: measuring step {step} failed: {type(err).__name__}: {err}", True
    finally:
        model.zero_grad(set_to_none=True)
    return None


def _seed_update(mon: Monitor, model: nn.Module, path: Path, trust: bool) -> None:
    """Resuming: give :class:`CheckpointUpdate` the last measured checkpoint's weights."""
    probe = next((p for p in mon.probes if isinstance(p, CheckpointUpdate)), None)
    with contextlib.suppress(CheckpointError):
        ckpt = load_checkpoint(path, trust=trust)
        check_weights(path, ckpt.weights, model)
        model.load_state_dict(ckpt.weights)
        if probe is not None:
            probe.remember(ckpt.step, mon.params)


@contextlib.contextmanager
def _bar(total: int, show: bool) -> Iterator[Any]:
    if not show or total == 0:
        yield _Silent()
        return
    with Progress(total, "scan") as bar:
        yield bar


class _Silent:
    def update(self, done: int, note: str = "") -> None:
        pass
