"""How the dashboard scales: a 10,000-step run with 200 parameter tensors.

Writes a synthetic run with every key the default probes record, every step (the loss
and learning rate; gradient, weight and update norms and the update ratio of each of
``--layers`` tensors; mean, std and zero fraction of as many module outputs; the totals
and the non-finite counts) through the real store, then times ``analyze``,
``dashboard.build``, both inside ``Run.reading_once()`` (as the CLI and the live server
run them) and ``to_html``, and reports the page size.

In a real headless chromium (Debian's, through Playwright when the ``playwright`` package
is installed: ``pip install -e ".[bench]"``), it then times what a person waits for,
each the median of ``--repeat`` tries, every one ending when the browser has painted the
next frame:

- load: from navigation until every row is drawn (against a one-row page of the run);
- zoom: ``Plotly.relayout`` of the shared step axis to a tenth of the run, and back;
- menu: switching the catch-all row to its next family;
- hover: moving the mouse onto a heatmap until the hover label is drawn;
- link: clicking a finding's evidence link (scroll and zoom).

Without Playwright it times the load alone (``chromium --dump-dom``).

    python benchmarks/dashboard.py [--steps 10000] [--layers 200] [--out page.html]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.chromium import BROWSER_FLAGS
from tests.synth import write_run

from trainprobe.analysis import analyze
from trainprobe.dashboard import build, extra_figures, to_html

FLAGS = [f for f in BROWSER_FLAGS if f != "--headless"]  # playwright adds its own


def series(steps: int, layers: int, seed: int = 0) -> dict:
    """The default probes' keys for ``layers`` tensors and modules, every step, with a loss
    spike at 60% of the run so the page has findings to link."""
    rng = np.random.default_rng(seed)
    s = np.arange(steps)
    loss = 2.0 * np.exp(-s / (steps / 4)) + 0.05 * rng.random(steps)
    loss[int(0.6 * steps)] *= 30
    out = {
        "scalars/loss": (s, loss),
        "optim/lr/0": (s, np.full(steps, 1e-3)),
        "norms/grad_total": (s, np.exp(rng.normal(0, 0.3, steps))),
        "norms/weight_total": (s, 20 + s / steps),
        "updates/norm_total": (s, 1e-2 * np.exp(rng.normal(0, 0.3, steps))),
        "updates/ratio_total": (s, 1e-3 * np.exp(rng.normal(0, 0.3, steps))),
    }
    for kind in ("loss", "grad", "param"):
        out[f"nonfinite/{kind}"] = (s, np.zeros(steps))
    for i in range(layers):
        name = f"blocks.{i // 4}.layer{i % 4}.weight"
        scale = 10.0 ** (-i / layers)
        noise = np.exp(rng.normal(0, 0.3, (4, steps)))
        out[f"norms/grad/{name}"] = (s, scale * noise[0])
        out[f"norms/weight/{name}"] = (s, (1 + i / layers) * (1 + s / (10 * steps)))
        out[f"updates/norm/{name}"] = (s, 1e-3 * (1 + i / layers) * noise[1])
        out[f"updates/ratio/{name}"] = (s, 1e-3 * noise[2])
        module = f"blocks.{i // 4}.act{i % 4}"
        out[f"activations/mean/{module}"] = (s, rng.normal(0, 0.1, steps))
        out[f"activations/std/{module}"] = (s, noise[3])
        out[f"activations/zero_frac/{module}"] = (s, np.full(steps, 0.5))
    return out


def timed(label: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    print(f"{label:<36} {time.perf_counter() - start:8.2f} s", flush=True)
    return result


def dump_dom_seconds(page: Path, chromium: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [chromium, "--headless", *FLAGS, "--dump-dom", page.as_uri()],
        capture_output=True,
        check=True,
        timeout=600,
    )
    return time.perf_counter() - start


_NEXT_FRAME = "() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)))"
_DRAWN = """() => { const gd = document.getElementById("trainprobe-dashboard");
  return gd && gd._fullLayout && gd.querySelectorAll(".subplot").length > 0; }"""
_ZOOM = """async (frac) => { const gd = document.getElementById("trainprobe-dashboard");
  const [lo, hi] = gd._fullLayout.xaxis.range; const t0 = performance.now();
  await Plotly.relayout(gd, {"xaxis.range": [lo, lo + frac * (hi - lo)]});
  await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  const t1 = performance.now(); await Plotly.relayout(gd, {"xaxis.autorange": true});
  await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  return [t1 - t0, performance.now() - t1]; }"""
_MENU = """async (i) => { const gd = document.getElementById("trainprobe-dashboard");
  const menu = gd.layout.updatemenus[0]; const b = menu.buttons[i % menu.buttons.length];
  const t0 = performance.now(); await Plotly.update(gd, ...b.args);
  await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  return performance.now() - t0; }"""
_LINK = """async () => { const a = document.querySelector("#tp-findings a[data-row]");
  const gd = document.getElementById("trainprobe-dashboard");
  const t0 = performance.now(); a.click();
  await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  const dt = performance.now() - t0; await Plotly.relayout(gd, {"xaxis.autorange": true});
  return dt; }"""


def browser_timings(page: Path, floor: Path, chromium: str, repeat: int) -> dict[str, float]:
    """Median milliseconds of each interaction (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    out: dict[str, list[float]] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=FLAGS)
        view = browser.new_page(viewport={"width": 1400, "height": 900})
        for label, target in (("load, one-row page", floor), ("load, full page", page)):
            for _ in range(repeat):
                start = time.perf_counter()
                view.goto(target.as_uri(), wait_until="load", timeout=600_000)
                view.wait_for_function(_DRAWN, timeout=600_000)
                view.evaluate(_NEXT_FRAME)
                out.setdefault(label, []).append(1000 * (time.perf_counter() - start))
        for i in range(repeat):
            zoom_in, zoom_out = view.evaluate(_ZOOM, 0.1)
            out.setdefault("zoom to 10% of steps", []).append(zoom_in)
            out.setdefault("zoom back out", []).append(zoom_out)
            if view.evaluate(
                "() => (document.getElementById('trainprobe-dashboard')"
                ".layout.updatemenus || []).length"
            ):
                out.setdefault("switch the catch-all family", []).append(
                    view.evaluate(_MENU, i + 1)
                )
            if view.query_selector("#tp-findings a[data-row]"):
                out.setdefault("finding link (scroll + zoom)", []).append(view.evaluate(_LINK))
            out.setdefault("hover a heatmap", []).append(_hover_ms(view))
        browser.close()
    return {label: statistics.median(values) for label, values in out.items()}


def _hover_ms(view) -> float:
    """Mouse onto the middle of the largest heatmap, until a hover label is in the DOM
    (NaN when none shows within 10 s)."""
    box = view.evaluate("""() => {
      const images = [...document.querySelectorAll("#trainprobe-dashboard .hm image")];
      const area = (e) => { const b = e.getBoundingClientRect(); return b.width * b.height; };
      const r = images.sort((a, b) => area(b) - area(a))[0];
      if (!r) return null; r.scrollIntoView({block: "center"});
      const b = r.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; }""")
    if box is None:
        return float("nan")
    view.mouse.move(0, 0)
    view.evaluate(_NEXT_FRAME)
    start = time.perf_counter()
    view.mouse.move(*box)
    try:
        view.wait_for_function(
            "() => document.querySelector('.hoverlayer .hovertext, .hoverlayer .legend')",
            timeout=10_000,
        )
    except Exception:  # playwright's TimeoutError: no label, no number
        return float("nan")
    view.evaluate(_NEXT_FRAME)
    return 1000 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also keep the page here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = series(args.steps, args.layers)
        values = sum(len(v) for _, v in data.values())
        print(f"{args.steps} steps x {args.layers} tensors: {len(data)} keys, {values:,} values")
        run = timed("write the run (store)", write_run, Path(tmp) / "run", data)
        findings = timed("analyze", analyze, run)
        fig = timed("dashboard.build", build, run, findings)

        def both():  # as the CLI and the live server do: each key read once for the two
            with run.reading_once():
                return build(run, analyze(run))

        timed("analyze + build, one read", both)
        page_text = timed("to_html", to_html, fig, *extra_figures(run))
        page = Path(tmp) / "page.html"
        page.write_text(page_text, encoding="utf-8")
        print(f"{'findings':<36} {len(findings):8d}")
        print(f"{'rows':<36} {len(fig.layout.annotations):8d}")
        print(f"{'page size':<36} {len(page_text) / 1e6:8.1f} MB")
        floor = Path(tmp) / "floor.html"
        small = write_run(Path(tmp) / "small", {"scalars/loss": data["scalars/loss"]})
        floor.write_text(to_html(build(small, [])), encoding="utf-8")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if not chromium:
            print("chromium not found: no browser timings")
        else:
            try:
                timings = browser_timings(page, floor, chromium, args.repeat)
            except ImportError:
                print("playwright not installed: load time only (chromium --dump-dom)")
                timings = {
                    "load, one-row page": 1000 * dump_dom_seconds(floor, chromium),
                    "load, full page": 1000 * dump_dom_seconds(page, chromium),
                }
            for label, ms in timings.items():
                print(f"{'chromium: ' + label:<36} {ms:8.0f} ms")
        if args.out:
            shutil.copy(page, args.out)


if __name__ == "__main__":
    main()
