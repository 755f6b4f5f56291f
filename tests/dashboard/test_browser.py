"""The dashboard as a page in a real headless browser (Debian's chromium).

The tests only look for the browser (:func:`chromium_or_skip`): ``chromium`` or
``chromium-browser`` on PATH, else ``/usr/bin/chromium``. They never install it;
``.ci/run`` does, with apt-get, when it is missing. Without it they skip and say why.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.chromium import BROWSER_FLAGS, find_chromium, missing_reason
from tests.synth import declared_meta, full_series, write_run
from trainprobe.analysis import analyze
from trainprobe.dashboard import build, extra_figures, to_html
from trainprobe.dashboard.links import SPAN_MARGIN


def chromium_or_skip() -> str:
    """The chromium executable, or ``pytest.skip`` naming where it looked and how to get it."""
    found = find_chromium()
    if found is None:
        pytest.skip(missing_reason())
    return found


def render(browser: str, page: Path | str, profile: Path) -> tuple[str, list[str]]:
    """``(DOM after the scripts ran, console messages)`` of ``page`` in headless chromium."""
    done = subprocess.run(
        [
            browser,
            *BROWSER_FLAGS,
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page if isinstance(page, str) else page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_console_capture_works(tmp_path):
    """A control: an erroring page does show up, so the next test's silence means something."""
    browser = chromium_or_skip()
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('probe-x'); nope();</script></body>")
    _, console = render(browser, page, tmp_path / "profile")
    assert any("probe-x" in line for line in console)
    assert any("ReferenceError" in line for line in console)


def test_dashboard_renders_without_errors(tmp_path):
    browser = chromium_or_skip()
    run = write_run(tmp_path / "run", full_series())
    findings = analyze(run)
    assert findings, "the synthetic run should give the detectors something to mark"
    fig = build(run, findings)
    page = tmp_path / "dashboard.html"
    page.write_text(to_html(fig, *extra_figures(run)), encoding="utf-8")
    dom, console = render(browser, page, tmp_path / "profile")
    assert console == [], "\n".join(console)
    drawn = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)  # what plotly rendered
    assert drawn.count('class="main-svg"') >= 2  # the dashboard (and the cosine matrix)
    titles = [
        re.search(r"<b>(.*?)</b>", a.text).group(1)
        for a in fig.layout.annotations
        if a.text and "<b>" in a.text
    ]
    assert len(titles) >= 20
    missing = [t for t in titles if f">{html.escape(html.unescape(t), quote=False)}<" not in drawn]
    assert missing == []
    assert drawn.count('class="shape-group"') == len(fig.layout.shapes) >= len(findings)
    for finding in findings:
        assert f"{finding.severity} finding" in drawn  # the findings timeline's legend


DRIVE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var gd = document.getElementById("trainprobe-dashboard"), out = {menus: [], errors: []};
  var menus = gd.layout.updatemenus || [];
  var chain = Promise.resolve();
  menus.forEach(function (menu) { menu.buttons.forEach(function (button) {
    chain = chain.then(function () {
      return Plotly.update.apply(null, [gd].concat(button.args)).then(function () {
        var shown = gd._fullData.filter(function (t) { return t.visible === true; }).length;
        var axis = Object.keys(button.args[1])[0].split(".")[0];  // "yaxis33"
        out.menus.push([button.label, shown, gd._fullLayout[axis].type]);
      });
    });
  }); });
  chain.then(function () {
    var link = document.querySelector("#tp-findings a[data-row]");
    out.link = link ? link.textContent : null;
    if (link) { link.click(); }
    // the link scrolls smoothly: wait until it has moved (up to 5 s; a loaded CI machine
    // gave the animation less than the 500 ms this once waited)
    return new Promise(function (done) {
      var tries = 0;
      (function poll() {
        if (window.scrollY > 0 || ++tries > 50) { done(); } else { setTimeout(poll, 100); }
      })();
    });
  }).then(function () {
    out.range = gd._fullLayout.xaxis.range;
    out.scrolled = window.scrollY;
  }).catch(function (err) { out.errors.push(String(err)); }).then(function () {
    var pre = document.createElement("pre"); pre.id = "tp-result";
    pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
  });
}, 200); });
</script>"""


def test_menus_and_finding_links_work_in_the_page(tmp_path):
    """Every choice of the catch-all row's menu applies, and a finding's evidence link
    scrolls to its row and zooms the shared step axis to the finding's span."""
    browser = chromium_or_skip()
    series = full_series()
    series.update(
        {
            f"updates/norm/{name}": (s, v)
            for name, (s, v) in (
                (k.split("/", 2)[2], series[k]) for k in list(series) if k.startswith("norms/grad/")
            )
        }
    )
    run = write_run(tmp_path / "run", series)
    findings = analyze(run)
    fig = build(run, findings)
    (menu,) = fig.layout.updatemenus
    assert len(menu.buttons) >= 2  # updates/norm/* and the nonfinite singles at least
    document = to_html(fig).replace("</body>", DRIVE + "</body>")
    page = tmp_path / "dashboard.html"
    page.write_text(document, encoding="utf-8")
    dom, console = render(browser, page, tmp_path / "profile")
    assert console == [], "\n".join(console)
    found = re.search(r'<pre id="tp-result">(.*?)</pre>', dom, flags=re.S)
    assert found, "the driving script did not finish"
    out = json.loads(html.unescape(found.group(1)))
    assert out["errors"] == []
    assert [label for label, _, _ in out["menus"]] == [b.label for b in menu.buttons]
    indices = set(menu.buttons[0].args[2])
    outside = sum(t.visible in (None, True) for i, t in enumerate(fig.data) if i not in indices)
    for (label, shown, axis_type), button in zip(out["menus"], menu.buttons, strict=True):
        assert shown == outside + sum(button.args[0]["visible"]), label
        (y_type,) = [v for k, v in button.args[1].items() if k.endswith(".type")]
        assert axis_type == y_type, label
    first = findings[0]  # the first link belongs to the first finding listed
    pad = max((first.end_step - first.start_step) * SPAN_MARGIN, 1)
    assert out["link"]
    assert out["range"] == pytest.approx([first.start_step - pad, first.end_step + pad])
    assert out["scrolled"] > 0


LIVE_DRIVE = """<script>
(function () {
  function drag(gd) {
    var box = gd.querySelector(".nsewdrag").getBoundingClientRect(), y = box.top + box.height / 2;
    function fire(type, x, target) {
      target.dispatchEvent(new MouseEvent(type, {bubbles: true, cancelable: true, clientX: x,
        clientY: y, buttons: type === "mouseup" ? 0 : 1, button: 0, view: window}));
    }
    var from = box.left + 0.2 * box.width, to = box.left + 0.5 * box.width;
    fire("mousedown", from, gd.querySelector(".nsewdrag"));
    fire("mousemove", (from + to) / 2, document);
    fire("mousemove", to, document);
    fire("mouseup", to, document);
  }
  var loads = +(sessionStorage.getItem("tp-loads") || 0) + 1;
  sessionStorage.setItem("tp-loads", loads);
  window.addEventListener("load", function () {
    var gd = document.getElementById("trainprobe-dashboard");
    drag(gd);  // the user zooms with the mouse, then follows a finding link (a script zoom)
    Plotly.relayout(gd, {"xaxis.range": [3, 9]}).then(function () {
      window.tpZoom = gd._fullLayout.xaxis.range.slice();
      var menu = gd.layout.updatemenus[0], last = menu.buttons.length - 1;
      return Plotly.relayout(gd, {"updatemenus[0].active": last}).then(function () {
        return Plotly.update.apply(null, [gd].concat(menu.buttons[last].args));
      });
    });
    setTimeout(function () {
      var names = gd.data.filter(function (t) { return t.visible !== false; })
        .map(function (t) { return t.name; });
      var pre = document.createElement("pre"); pre.id = "tp-result";
      var title = gd.layout.annotations.map(function (a) { return a.text; })
        .filter(function (t) { return /Every other recorded series/.test(t); })[0];
      pre.textContent = JSON.stringify({loads: loads, names: names, zoom: window.tpZoom,
        title: title, stray: Object.keys(gd.layout).filter(function (k) {
          return k.indexOf("[") >= 0; }),
        range: gd._fullLayout.xaxis.range, active: gd.layout.updatemenus[0].active,
        count: document.getElementById("tp-findings-count") &&
          document.getElementById("tp-findings-count").textContent});
      document.body.appendChild(pre);
    }, 4000);
  });
})();
</script>"""


def test_live_page_redraws_in_place_keeping_zoom_and_menu(tmp_path):
    """A page built before the run moved on polls, fetches /figure.json and redraws with
    Plotly.react: the new series appear, the user's zoom and menu choice (the family, now
    with one more member) stay, no reload. (New rows make the page reload instead.)"""
    from trainprobe.cli import serve as serve_cli
    from trainprobe.store import Record, RunWriter

    browser = chromium_or_skip()
    writer = RunWriter(tmp_path / "run")
    writer.set_meta(declared_meta("sharpness", "updates"))  # the probes' key meanings
    first = {"scalars/loss": 2.0, "sharpness/lr": 0.1, "updates/norm/a": 1.0, "updates/norm/b": 2.0}
    writer.append(Record(s, {**first, "scalars/loss": 2.0 - s / 100}) for s in range(20))
    stale = serve_cli.page(writer.run_dir, refresh_ms=300)  # what a browser opened earlier
    later = {**first, "scalars/val_loss": 1.5, "updates/norm/c": 3.0}  # no new row: in place
    writer.append(Record(s, later) for s in range(20, 40))
    server = serve_cli.make_server(writer.run_dir, 0, refresh_seconds=0.3)
    base_handler = server.RequestHandlerClass

    class Stale(base_handler):
        def do_GET(self):
            if self.path == "/stale":
                self._send(
                    200,
                    "text/html; charset=utf-8",
                    stale.replace("</body>", LIVE_DRIVE + "</body>"),
                )
            else:
                super().do_GET()

    server.RequestHandlerClass = Stale
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/stale"
        dom, console = render(browser, url, tmp_path / "profile")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        writer.close()
    assert console == [], "\n".join(console)
    found = re.search(r'<pre id="tp-result">(.*?)</pre>', dom, flags=re.S)
    assert found, "the driving script did not finish"
    out = json.loads(html.unescape(found.group(1)))
    assert out["loads"] == 1  # redrawn in place, not reloaded
    assert "val_loss" in out["names"]  # a series written after the page was built
    assert out["zoom"] == [3, 9]  # the link's zoom, after the mouse's ...
    assert out["range"] == pytest.approx([3, 9])  # ... survived Plotly.react
    assert out["active"] == 1  # so did the catch-all row's menu choice: its family shows
    assert {"a", "b", "c"} <= set(out["names"]) and "sharpness/lr" not in out["names"]
    assert "optimizer step per tensor" in out["title"]  # the chosen family's explanation
    assert out["stray"] == []  # "annotations[k].text" went into the array, not a new key


def test_missing_browser_skips_and_says_why(monkeypatch):
    """No browser anywhere: a skip that says where the tests looked and how to install it,
    and never a call to apt (or anything else) from the test."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"the browser tests ran {args!r}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    with pytest.raises(pytest.skip.Exception, match=r"chromium is not installed.*\.ci/run"):
        chromium_or_skip()


def test_the_fallback_path_is_found_off_path(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) == "/usr/bin/chromium")
    monkeypatch.setattr(os.path, "isfile", lambda path: str(path) == "/usr/bin/chromium")
    assert chromium_or_skip() == "/usr/bin/chromium"


MEASURE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var gd = document.getElementById("trainprobe-dashboard");
  function boxes(root, selector) {
    return Array.from(root.querySelectorAll(selector)).filter(function (e) {
      return e.textContent.trim(); }).map(function (e) {
      var r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; });
  }
  var out = {rows: {}, captions: boxes(gd, "g.annotation text"),
             menus: boxes(gd, ".updatemenu-header-group")};
  gd.querySelectorAll("g.subplot").forEach(function (plot) {
    out.rows[plot.classList[1]] = {x: boxes(plot, ".xaxislayer-above text"),
                                   y: boxes(plot, ".yaxislayer-above text")};
  });
  var pre = document.createElement("pre"); pre.id = "tp-result";
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
}, 200); });
</script>"""


def test_drawn_rows_are_labelled_and_nothing_covers_a_title_line(tmp_path):
    """In the drawn page: every row numbers its steps, every log row shows three or more
    y labels (a loss within one decade too), and no step number or menu overlaps a row's
    title line (boxes of the drawn text, as the browser lays it out)."""
    browser = chromium_or_skip()
    series = full_series()
    steps = np.arange(400)
    series["scalars/loss"] = (steps, 0.9 - 0.6 * steps / 399)  # within one decade
    series["norms/grad_total"] = (steps, 1.5 + 0.2 * np.sin(steps / 10))  # within a few %
    run = write_run(tmp_path / "run", series)
    fig = build(run)
    page = tmp_path / "dashboard.html"
    page.write_text(to_html(fig).replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom, console = render(browser, page, tmp_path / "profile")
    assert console == [], "\n".join(console)
    found = re.search(r'<pre id="tp-result">(.*?)</pre>', dom, flags=re.S)
    assert found, "the measuring script did not finish"
    out = json.loads(html.unescape(found.group(1)))
    y_names = [k for k in fig.layout if k.startswith("yaxis")]
    plots = {f"x{k[5:]}y{k[5:]}": k for k in y_names}
    assert set(out["rows"]) == set(plots)
    assert [p for p, row in out["rows"].items() if not row["x"]] == []  # steps on every row
    logs = [p for p, k in plots.items() if fig.layout[k].type == "log"]
    assert "xy" in logs and len(logs) >= 3  # the loss row and the global norms at least
    few = {p: len(out["rows"][p]["y"]) for p in logs if len(out["rows"][p]["y"]) < 3}
    assert few == {}

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    ticks = [box for row in out["rows"].values() for box in row["x"]]
    assert len(out["captions"]) == len(plots) and len(out["menus"]) == 1
    for caption in out["captions"]:
        assert [t for t in ticks if overlap(t, caption)] == [], caption
        assert [m for m in out["menus"] if overlap(m, caption)] == [], caption
    assert [t for t in ticks for m in out["menus"] if overlap(t, m)] == []
