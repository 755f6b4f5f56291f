"""How the dashboard scales: a 10,000-step run with 200 parameter tensors.

Writes a synthetic run (the loss every step; gradient norms, update ratios and
activation std of ``--layers`` tensors every step) through the real store, then times
``analyze``, ``dashboard.build`` and ``to_html``, reports the page size, and, when
``chromium`` is on the PATH, the time headless chromium takes to load and render the
page (``--dump-dom``, which returns once scripts have run) against a one-row page of
the same run as the floor.

    python benchmarks/dashboard.py [--steps 10000] [--layers 200] [--out page.html]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.synth import write_run

from trainprobe.analysis import analyze
from trainprobe.dashboard import build, extra_figures, to_html


def series(steps: int, layers: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s = np.arange(steps)
    out = {"scalars/loss": (s, 2.0 * np.exp(-s / (steps / 4)) + 0.05 * rng.random(steps))}
    for i in range(layers):
        name = f"blocks.{i // 4}.layer{i % 4}.weight"
        scale = 10.0 ** (-i / layers)
        out[f"norms/grad/{name}"] = (s, scale * np.exp(rng.normal(0, 0.3, steps)))
        out[f"updates/ratio/{name}"] = (s, 1e-3 * np.exp(rng.normal(0, 0.3, steps)))
        out[f"activations/std/{name}"] = (s, np.exp(rng.normal(0, 0.1, steps)))
    return out


def timed(label: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    print(f"{label:<32} {time.perf_counter() - start:8.2f} s", flush=True)
    return result


def render_seconds(page: Path, chromium: str) -> float:
    start = time.perf_counter()
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                    page.as_uri()], capture_output=True, check=True, timeout=600)  # fmt: skip
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="also keep the page here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = series(args.steps, args.layers)
        values = sum(len(v) for _, v in data.values())
        print(f"{args.steps} steps x {args.layers} tensors: {len(data)} keys, {values:,} values")
        run = timed("write the run (store)", write_run, Path(tmp) / "run", data)
        findings = timed("analyze", analyze, run)
        fig = timed("dashboard.build", build, run, findings)
        page_text = timed("to_html", to_html, fig, *extra_figures(run))
        page = Path(tmp) / "page.html"
        page.write_text(page_text, encoding="utf-8")
        print(f"{'page size':<32} {len(page_text) / 1e6:8.1f} MB")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            floor = Path(tmp) / "floor.html"
            small = write_run(Path(tmp) / "small", {"scalars/loss": data["scalars/loss"]})
            floor.write_text(to_html(build(small, [])), encoding="utf-8")
            base = render_seconds(floor, chromium)
            full = render_seconds(page, chromium)
            print(f"{'chromium load+render, one row':<32} {base:8.2f} s")
            print(f"{'chromium load+render, full page':<32} {full:8.2f} s")
        else:
            print("chromium not found: no render timing")
        if args.out:
            shutil.copy(page, args.out)


if __name__ == "__main__":
    main()
