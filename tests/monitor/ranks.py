"""Run a function on ``world`` CPU processes joined by gloo on 127.0.0.1, with a deadline.

``spawn(fn, world, tmp_path, *args)`` calls ``fn(rank, world, tmp_path, *args)`` in each
process inside an initialised default process group; a process that raises fails the
test with its traceback, and a process still running at the deadline (a hang in a
collective) is killed and fails it too. What a worker reports comes back through files
under ``tmp_path`` (``report(tmp_path, rank, obj)`` / ``reports(tmp_path, world)``).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, tmp_path: Path, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(rank, world, tmp_path, *args)
        dist.barrier()  # every rank done before any tears the group down
    except BaseException:
        (tmp_path / f"error_{rank}.txt").write_text(traceback.format_exc())
        dist.destroy_process_group()
        raise
    # Done: leave without tearing gloo down. Its destructors at interpreter exit sometimes
    # abort a rank ("terminate called without an active exception", SIGABRT) once the
    # peer has closed its sockets: seen in 3 of ~250 spawned runs on 2 cores, after every
    # collective had completed. Nothing is left to flush: reports are files, written.
    os._exit(0)


def spawn(fn: Callable, world: int, tmp_path: Path, *args: Any, deadline: float = 120) -> None:
    """Run ``fn`` on ``world`` ranks; raise with the first failing rank's traceback."""
    context = mp.start_processes(
        _entry,
        args=(fn, world, _free_port(), tmp_path, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline
    try:
        # join returns as soon as one process exits (False while others run): loop
        while not context.join(timeout=max(end - time.monotonic(), 0.01)):
            if time.monotonic() >= end:
                raise TimeoutError(f"{world} ranks still running after {deadline} s: a hang")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        errors = sorted(tmp_path.glob("error_*.txt"))
        detail = errors[0].read_text() if errors else f"{type(err).__name__}: {err}"
        raise AssertionError(f"a rank failed:\n{detail}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def report(tmp_path: Path, rank: int, obj: Any) -> None:
    (tmp_path / f"report_{rank}.json").write_text(json.dumps(obj))


def reports(tmp_path: Path, world: int) -> list[Any]:
    return [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in range(world)]


def rank_share(rank: int, world: int, batch):
    """Rank ``rank``'s rows of a global ``(x, y)`` batch split evenly over ``world`` ranks."""
    x, y = batch
    size = x.shape[0]
    rows = slice(rank * size // world, (rank + 1) * size // world)
    return x[rows], y[rows]
