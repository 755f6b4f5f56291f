"""Real processes that write runs (trained, appended to, killed) and read-only paths, for the
store, monitor and command-line tests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TRAIN_SCRIPT = """
import sys
import torch
from torch import nn
from torch.nn import functional as F
import trainprobe

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
with trainprobe.watch(model, trainprobe.default_probes(every_n=3), run_dir=sys.argv[1],
                      optimizer=opt, flush_seconds=0) as mon:
    for step in range(1_000_000):
        with mon.step(step, batch=(x, y)) as s:
            if step > 0:  # flush_seconds=0: step - 1 was committed when this block began
                print(step - 1, flush=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            s.log(loss=loss)
        opt.step()
        opt.zero_grad()
"""

APPEND_SCRIPT = """
import sys, time
import numpy as np
from trainprobe.store import Record, RunWriter

steps, pause = int(sys.argv[2]), float(sys.argv[3])
writer = RunWriter(sys.argv[1])
for step in range(steps):
    values = {f"k/{i:02d}": step + i / 100 for i in range(40)}
    values["arr"] = np.full(64, step, dtype=np.int64)
    writer.append([Record(step, values)])
    print(step, flush=True)
    time.sleep(pause)
writer.close()
"""


class Child:
    """A Python subprocess whose stdout lines are read with a deadline (never hangs)."""

    def __init__(self, tmp_path: Path, script: str, *args: object) -> None:
        path = tmp_path / f"child_{hashlib.sha1(script.encode()).hexdigest()[:10]}.py"
        if not path.exists():  # children of one test share it; never rewrite a running one
            path.write_text(script)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(path), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: list[str] = []
        self._partial = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def read_until(self, count: int, timeout: float = 60.0) -> list[int]:
        """Steps reported so far, reading until at least ``count`` lines (or EOF)."""
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"child reported {len(self.lines)} steps, wanted {count}")
            if not self._selector.select(left):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            *done, self._partial = (self._partial + chunk).split(b"\n")
            self.lines.extend(line.decode() for line in done)
        return [int(line) for line in self.lines]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def finish(self, timeout: float = 30.0) -> list[int]:
        steps = self.read_until(sys.maxsize, timeout)
        err = self.proc.stderr.read().decode()
        assert self.proc.wait(timeout=10) == 0, err
        return steps

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._selector.close()
        self.proc.stdout.close()
        self.proc.stderr.close()


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (a directory: no entry can be created in it; a file: it cannot be written)
    made read-only for this process, for real: ``chmod`` for a user, and for root, whom
    ``chmod`` does not stop, the immutable attribute (``chattr +i``). Skips the test where
    neither holds (no ``chattr``, a file system without the attribute)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)

        def undo() -> None:
            path.chmod(mode)
    else:
        chattr = shutil.which("chattr")
        if (
            chattr is None
            or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode
        ):
            pytest.skip("cannot make a read-only path here: root, and no working chattr +i")

        def undo() -> None:
            subprocess.run([chattr, "-i", str(path)], check=True)

    try:
        _check_read_only(path)
        yield path
    finally:
        undo()


def _check_read_only(path: Path) -> None:
    target = path / ".write-test" if path.is_dir() else path
    try:
        with open(target, "a"):
            pass
    except OSError:
        return
    if path.is_dir():
        target.unlink()
    pytest.skip(f"{path} stayed writable: cannot test a read-only path here")
