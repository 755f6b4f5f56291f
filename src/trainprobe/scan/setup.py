"""The scan's setup as opposed to its checkpoints: the batch ``data_fn`` gives, and the
failures that come from the model, data or loss (they would repeat at every checkpoint)
rather than from one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor


def first_batch(data: Any) -> Any:
    """``data`` itself when it is one batch, else the first batch of those it holds.

    One batch: a tensor, a tuple (``(inputs, targets)``), a dict, or a list that holds
    anything but batches (``[inputs, targets]``). Batches: a list whose items are all
    tuples, lists or dicts (``[(x0, y0), (x1, y1)]``), or anything else iterable (a
    DataLoader, a generator): the first one is used.

    Raises:
        ValueError: ``data`` is None, an empty list or an empty iterable.
    """
    if data is None:
        raise ValueError("data_fn() returned None; return a batch, e.g. (inputs, targets)")
    if isinstance(data, list) and not data:
        raise ValueError("data_fn() returned an empty list; return a batch or a list of batches")
    if isinstance(data, list) and all(isinstance(item, tuple | list | dict) for item in data):
        return data[0]  # a list of batches
    if isinstance(data, Tensor | tuple | list | dict):
        return data
    try:
        return next(iter(data))
    except TypeError:
        return data  # not iterable: a custom batch object
    except StopIteration:
        raise ValueError(
            "data_fn() returned an empty iterable; return a batch, e.g. (inputs, targets)"
        ) from None


def stop_if_repeating(
    failure: tuple[str, bool], path: Path, first: tuple[str, str] | None, total: int
) -> tuple[str, str]:
    """Called while nothing is measured yet: raise when ``failure`` would repeat at every
    checkpoint (see :func:`~trainprobe.scan.scan`); else return the first failure
    ``(file, reason)``.

    Raises:
        ValueError: the model or the loss raised, or ``failure`` is the first failure's
            reason again (their file names aside).
    """
    reason, measuring = failure
    if measuring:
        raise ValueError(
            f"{reason}; the scan stopped here, before measuring any checkpoint: the model, the "
            f"loss and the batch are the same for all {total}, so it would fail at each; fix "
            "--model/--data/--loss (model_fn/data_fn/loss_fn) and scan again"
        )
    if first is None:
        return path.name, reason
    name, earlier = first
    if earlier.replace(name, "") == reason.replace(path.name, ""):
        raise ValueError(
            f"{earlier}; {path.name} failed the same way, so the scan stopped instead of "
            f"listing this for each of the {total} checkpoints: check that --model builds the "
            "architecture that was saved (and --trust-checkpoints for whole pickled models)"
        )
    return first
