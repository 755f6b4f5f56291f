"""Mirroring: what the monitor commits to the store also goes to the trackers people read.

``watch(model, ..., mirror=writer)`` sends every value committed to the run's store (probe
values and ``scalars/*``) to TensorBoard, Weights & Biases, a Lightning logger or any object
with ``write(step, values)`` (:class:`Mirror`), and, when the monitor closes, the findings of
:func:`trainprobe.analysis.analyze`. The store stays the system of record; a mirror is a
copy:

- values go out at each flush, after the store committed them, from the host values the
  flush already moved (no extra device sync); a later flush may add keys to a step already
  mirrored (an update probe's values, ``mon.log`` after a flush), never repeat one;
- a tracker that raises is warned about once and left out for the rest of the run:
  training goes on, and the store keeps every value;
- under ``torch.distributed`` rank 0 mirrors (the rank that writes the store).

What each tracker receives, by the method it has (looked for in this order):

=========================  ==============================  ================================
tracker (duck-typed)       values                          findings, at close
=========================  ==============================  ================================
``write(step, values)``    scalars, as ``float``           ``findings(list[Finding])``, if
(:class:`Mirror`)                                          it has one (an empty list too)
``add_scalar`` (a          scalars as ``add_scalar``       ``add_text("trainprobe/findings",
TensorBoard                writes them (float32; torch's   text, i)`` for the i-th finding
``SummaryWriter``)         writer: one event per record);  (torch shows the tag as
                           arrays as ``add_histogram`` of  ``trainprobe/findings/
                           their finite entries            text_summary``); ``flush()``
``log_metrics`` (a         ``log_metrics(scalars, step)``  ``log_hyperparams({"trainprobe/
Lightning logger)                                          findings/i": text})``; ``save()``
``log`` (a W&B run)        ``log(scalars, step=step)``     ``summary.update({"trainprobe/
                                                           findings/i": text})``
=========================  ==============================  ================================

Non-finite values are passed on as they are (TensorBoard and W&B store nan and inf).
Keys are the record keys (``norms/grad/fc1.weight``, ``scalars/loss``); findings come most
severe first, as :func:`~trainprobe.analysis.analyze` returns them.
"""

from __future__ import annotations

import inspect
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ..notices import warn_user
from ..store import Record

if TYPE_CHECKING:
    from ..analysis import Finding

FINDINGS_TAG = "trainprobe/findings"
"""The tag (TensorBoard) or key prefix (W&B, Lightning) of the findings sent at close."""


@runtime_checkable
class Mirror(Protocol):
    """What ``watch(mirror=...)`` takes besides the trackers it knows: any object with
    ``write(step, values)``.

    ``write`` is called once per committed record, in commit order, with that record's
    scalars (``{record key: float}``, nan and inf as they are; arrays are left out). An
    object that also has ``findings(findings)`` gets, when the monitor closes, the list of
    :class:`~trainprobe.analysis.Finding` that :func:`trainprobe.analysis.analyze` returns
    for the run (possibly empty).

    Examples:
        >>> class Collect:
        ...     def __init__(self):
        ...         self.rows = []
        ...     def write(self, step, values):
        ...         self.rows.append((step, dict(values)))
        >>> isinstance(Collect(), Mirror)
        True
    """

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Take the scalars committed for ``step``."""


def finding_text(finding: Finding) -> str:
    """One finding as one Markdown paragraph: severity, step span, detector, message and
    the action to take (what TensorBoard's text panel and W&B's summary show)."""
    if finding.start_step == finding.end_step:
        span = f"step {finding.start_step}"
    else:
        span = f"steps {finding.start_step}-{finding.end_step}"
    severity = str(finding.severity).upper()
    return f"**{severity}** {span} `{finding.detector}`: {finding.message} → {finding.action}"


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """``values`` without its arrays, each number as a ``float``."""
    return {k: float(v) for k, v in values.items() if not isinstance(v, np.ndarray)}


def _numbered(texts: Sequence[str]) -> dict[str, str]:
    return {f"{FINDINGS_TAG}/{i}": text for i, text in enumerate(texts)}


class WriteMirror:
    """A :class:`Mirror` object: scalars to its ``write``, findings to its ``findings``."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        scalars = _scalars(values)
        if scalars:
            self.target.write(step, scalars)

    def findings(self, findings: Sequence[Finding]) -> None:
        deliver = getattr(self.target, "findings", None)
        if callable(deliver):
            deliver(list(findings))


class TensorBoardMirror:
    """A TensorBoard ``SummaryWriter``: each scalar as ``add_scalar`` would write it
    (``simple_value``, float32, TensorBoard's scalar type), arrays as histograms of their
    finite entries.

    For torch's ``SummaryWriter`` the scalars of one record go out as one event (one
    ``Summary`` with a value per key, what ``add_scalar`` writes one event each for), so
    the cost is one queue hand-off per record instead of one per key; other writers
    (tensorboardX, look-alikes) get one ``add_scalar`` per value.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._summary = _torch_summary_type(writer)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        scalars = {}
        for key, value in values.items():
            if isinstance(value, np.ndarray):
                finite = value[np.isfinite(value)].astype(np.float64)  # [n finite]
                if finite.size:  # a histogram needs a finite range
                    self.writer.add_histogram(key, finite, step)
            else:
                scalars[key] = float(value)
        if not scalars:
            return
        if self._summary is None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            return
        summary = self._summary()
        add = summary.value.add  # built in place: half the time of a list of Values
        for key, value in scalars.items():
            add(tag=key, simple_value=value)
        self.writer._get_file_writer().add_summary(summary, step)  # reopens, as add_scalar

    def findings(self, findings: Sequence[Finding]) -> None:
        for i, finding in enumerate(findings):  # increasing steps: none replaces another
            self.writer.add_text(FINDINGS_TAG, finding_text(finding), i)
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()


def _torch_summary_type(writer: Any) -> Any:
    """The ``Summary`` protobuf class when ``writer`` is torch's ``SummaryWriter`` (whose
    module is loaded then: the caller made one), else None."""
    module = sys.modules.get("torch.utils.tensorboard")
    if module is None or not isinstance(writer, module.SummaryWriter):
        return None
    if not callable(getattr(writer, "_get_file_writer", None)):
        return None
    from tensorboard.compat.proto.summary_pb2 import Summary  # what torch's summaries use

    return Summary


class LightningMirror:
    """A Lightning logger: ``log_metrics`` per record, findings as hyperparameters."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        scalars = _scalars(values)
        if scalars:
            self.logger.log_metrics(scalars, step)

    def findings(self, findings: Sequence[Finding]) -> None:
        if findings:
            self.logger.log_hyperparams(_numbered([finding_text(f) for f in findings]))
        save = getattr(self.logger, "save", None)
        if callable(save):  # loggers that buffer (CSVLogger) write now
            save()


class WandbMirror:
    """A W&B run: ``log(scalars, step=step)`` per record, findings into its summary."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        scalars = _scalars(values)
        if scalars:
            self.run.log(scalars, step=step)

    def findings(self, findings: Sequence[Finding]) -> None:
        summary = getattr(self.run, "summary", None)
        if findings and summary is not None:
            summary.update(_numbered([finding_text(f) for f in findings]))


@dataclass(frozen=True)
class Adapter:
    """How a kind of tracker is recognised (it has ``method``, callable with ``sample``
    arguments) and wrapped (``make(tracker)``)."""

    method: str
    sample: tuple[tuple[Any, ...], dict[str, Any]]
    kind: str
    make: Callable[[Any], Any]


ADAPTERS = (
    Adapter("write", ((0, {}), {}), "a Mirror (write(step, values))", WriteMirror),
    Adapter(
        "add_scalar",
        (("key", 0.0, 0), {}),
        "a TensorBoard SummaryWriter (add_scalar(tag, value, step))",
        TensorBoardMirror,
    ),
    Adapter("log_metrics", (({}, 0), {}), "a Lightning logger (log_metrics)", LightningMirror),
    Adapter("log", (({},), {"step": 0}), "a W&B run (log(dict, step=))", WandbMirror),
)
"""Tried in this order: the first whose method the tracker has, callable with the sample
arguments, picks the adapter."""

ACCEPTED = ", ".join(a.kind for a in ADAPTERS) + ", or a list of these"


def _takes(method: Any, sample: tuple[tuple[Any, ...], dict[str, Any]]) -> bool:
    """Whether ``method`` is callable with the ``(args, kwargs)`` of ``sample`` (True where
    Python cannot tell, e.g. some builtins)."""
    if not callable(method):
        return False
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*sample[0], **sample[1])
    except TypeError:
        return False
    return True


def adapt(target: Any) -> tuple[str, Any]:
    """``(name, adapter)`` for one tracker (see :data:`ADAPTERS`).

    Raises:
        TypeError: ``target`` has none of the methods, or not with their arguments.
    """
    for adapter in ADAPTERS:
        if _takes(getattr(target, adapter.method, None), adapter.sample):
            return type(target).__name__, adapter.make(target)
    raise TypeError(f"watch(mirror=...) takes {ACCEPTED}; got {type(target).__name__}")


class Mirrors:
    """The trackers of one monitor; a tracker that raises is warned about and dropped.

    Args:
        mirror: None, one tracker or a list of them (see the module's table).

    Raises:
        TypeError: a tracker is none of the accepted kinds.
    """

    def __init__(self, mirror: Any = None) -> None:
        many = isinstance(mirror, list | tuple)
        targets = [] if mirror is None else list(mirror) if many else [mirror]
        self.targets: list[tuple[str, Any]] = [adapt(t) for t in targets]
        self._queue: queue.SimpleQueue[list[Record] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __bool__(self) -> bool:
        return bool(self.targets)

    def write(self, records: Iterable[Record]) -> None:
        """Hand the committed records to the mirroring thread (the training thread only
        queues them: a tracker's own cost, e.g. TensorBoard's event checksums, runs
        beside training), which sends each to every tracker still on, in order."""
        if not self.targets:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._drain, name="trainprobe-mirror", daemon=True
            )
            self._thread.start()
        self._queue.put(list(records))

    def _drain(self) -> None:
        while (records := self._queue.get()) is not None:
            for record in records:
                self._each(lambda adapter, r=record: adapter.write(int(r.step), r.values))

    def close(self, run_dir: str | Path) -> None:
        """Wait until every queued record is sent, then analyse the run in ``run_dir`` and
        send its findings to every tracker still on; an analysis that fails is warned
        about (training is over; the store is intact)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if not self.targets:
            return
        try:
            findings = _analyze(run_dir)
        except Exception as err:
            warn_user(
                f"trainprobe: the run's findings were not mirrored: analysing {run_dir} "
                f"raised {type(err).__name__}: {err}; `trainprobe report {run_dir}` reads them"
            )
            return
        self._each(lambda adapter: adapter.findings(findings))

    def _each(self, send: Callable[[Any], None]) -> None:
        for entry in list(self.targets):
            try:
                send(entry[1])
            except Exception as err:
                self.targets.remove(entry)
                warn_user(
                    f"trainprobe: mirroring to {entry[0]} stopped for the rest of the run: it "
                    f"raised {type(err).__name__}: {err}; training goes on, and the run's store "
                    "keeps every value"
                )


def _analyze(run_dir: str | Path) -> list[Finding]:
    from ..analysis import analyze  # the reading side, loaded only when a run is mirrored
    from ..store import Run

    with Run(run_dir) as run:
        return analyze(run)
