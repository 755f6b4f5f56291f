"""``trainprobe dashboard RUN_DIR --serve``: the dashboard on localhost, following a live run.

Each request for ``/`` opens the run afresh (a :class:`Run` reads each committed step, and a
fresh one also sees new metadata), analyses it and builds the page, so the page is never
older than the store. The page polls ``/status`` every few seconds; when the run has new
steps it fetches ``/figure.json`` (the figures and the findings list, not plotly.js) and
redraws in place with ``Plotly.react``: the step-axis zoom (a mouse zoom or a finding
link's), legend choices (traces have stable ``uid``) and the catch-all row's menu choice
(matched by family) are kept. It reloads whole only when rows, a findings list or a
figure appear or go, since plotly keeps interface state by axis and trace position.
Polls never overlap: the next starts after the last answer. Standard library
``http.server`` only; bound to 127.0.0.1, never to other machines.

Importing this module is cheap (``trainprobe --help`` adds its options to the parser):
``http.server``, the store, the analysis and the dashboard are imported when serving.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ..store import Run

    _RequestHandler = BaseHTTPRequestHandler
else:
    _RequestHandler = object  # make_server mixes in http.server's handler

HOST = "127.0.0.1"

_SCRIPT = """<script>
(function () {{
  var seen = {state}, every = {ms};
  function same(a, b) {{ return JSON.stringify(a) === JSON.stringify(b); }}
  function rows(layout) {{
    var meta = layout && layout.meta && layout.meta["{meta}"];
    return meta ? meta.rows.map(function (r) {{ return r.name; }}) : [];
  }}
  function family(label) {{ return String(label).replace(/ \\(\\d+\\)$/, ""); }}
  function setPath(obj, path, value) {{  // "annotations[3].text" = value (null: unset)
    var keys = [];
    path.split(".").forEach(function (part) {{
      var m = /^(\\w+)\\[(\\d+)\\]$/.exec(part);
      if (m) {{ keys.push(m[1], +m[2]); }} else {{ keys.push(part); }}
    }});
    var last = keys.pop();
    keys.forEach(function (k, i) {{
      var next = i + 1 < keys.length ? keys[i + 1] : last;
      if (obj[k] === undefined || obj[k] === null) {{
        obj[k] = typeof next === "number" ? [] : {{}};
      }}
      obj = obj[k];
    }});
    if (value === null) {{ delete obj[last]; }} else {{ obj[last] = value; }}
  }}
  function keepChoices(main, figure) {{  // the user's menu choices, matched by family
    var old = (main.layout.updatemenus || []), menus = figure.layout.updatemenus || [];
    old.forEach(function (menu, i) {{
      var chosen = menu.buttons[menu.active || 0], now = menus[i];
      if (!chosen) {{ return; }}
      var want = family(chosen.label);
      var k = now ? now.buttons.map(function (b) {{ return family(b.label); }}).indexOf(want) : -1;
      if (k <= 0) {{ return; }}
      var args = now.buttons[k].args;
      now.active = k;
      args[2].forEach(function (t, j) {{ figure.data[t].visible = args[0].visible[j]; }});
      Object.keys(args[1]).forEach(function (path) {{
        setPath(figure.layout, path, args[1][path]); }});
    }});
  }}
  function keepZoom(main, figure) {{  // a link's zoom too, which uirevision would not keep
    var x = main._fullLayout.xaxis;
    if (!x || x.autorange) {{ return; }}
    Object.keys(figure.layout).filter(function (k) {{ return /^xaxis\\d*$/.test(k); }})
      .forEach(function (k) {{  // every axis of the shared group: the bottom one rules it
        setPath(figure.layout, k + ".range", x.range.slice());
        setPath(figure.layout, k + ".autorange", false);
      }});
  }}
  function redraw(data) {{
    var main = document.getElementById("{main}");
    var list = document.getElementById("tp-findings-list");
    var extras = document.querySelectorAll("[id^='{extra}']");
    if (!main || !!list !== data.count > 0 || extras.length !== data.extras.length ||
        !same(rows(main.layout), rows(data.figure.layout))) {{
      location.reload(); return Promise.resolve();  // rows came or went: a new page
    }}
    if (list) {{
      list.innerHTML = data.items;
      document.getElementById("tp-findings-count").textContent = data.count;
    }}
    keepChoices(main, data.figure);
    keepZoom(main, data.figure);
    var done = Plotly.react(main, data.figure.data, data.figure.layout);
    data.extras.forEach(function (fig, i) {{
      done = done.then(function () {{ return Plotly.react(extras[i], fig.data, fig.layout); }});
    }});
    return done;
  }}
  function poll() {{
    fetch("/status", {{cache: "no-store"}}).then(function (r) {{ return r.json(); }})
      .then(function (now) {{
        if (same(now, seen)) {{ return; }}
        return fetch("/figure.json", {{cache: "no-store"}}).then(function (r) {{
          if (!r.ok) {{ throw new Error("figure.json: " + r.status); }}
          return r.json();
        }}).then(function (data) {{
          return redraw(data).then(function () {{ seen = data.state; }});
        }});
      }})
      .catch(function (err) {{ console.warn("trainprobe live view:", err); }})
      .then(function () {{ setTimeout(poll, every); }});
  }}
  setTimeout(poll, every);
}})();
</script>"""
"""Polls ``/status``; on a change, redraws from ``/figure.json`` (see the module docstring)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--serve``, ``--port`` and ``--refresh`` to the ``dashboard`` parser."""
    parser.add_argument(
        "--serve",
        action="store_true",
        help="serve the dashboard on localhost and follow the run while it trains",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=8050,
        help="port for --serve (default: %(default)s; 0 picks a free one)",
    )
    parser.add_argument(
        "--refresh",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --serve, how often the page checks for new steps (default: %(default)s)",
    )


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0: any free port), got {value}")
    return value


def make_server(
    run_dir: str | Path, port: int = 0, *, refresh_seconds: float = 5.0
) -> ThreadingHTTPServer:
    """A server (not yet serving) for the dashboard of ``run_dir`` on 127.0.0.1.

    Args:
        run_dir: the run to show; it must exist already.
        port: TCP port; 0 picks a free one (read it from ``server.server_address[1]``).
        refresh_seconds: how often the page asks whether the run has new steps.

    Returns:
        A ``ThreadingHTTPServer``; call ``serve_forever()``, then ``shutdown()`` and
        ``server_close()``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run (yet): start training first.
        ValueError: ``refresh_seconds`` is not positive.
        OSError: the port is taken (the message names it and suggests ``--port 0``).
    """
    if not refresh_seconds > 0:
        raise ValueError(
            f"refresh_seconds must be positive, got {refresh_seconds}; e.g. --refresh 5"
        )
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ..store import Run

    run_dir = Path(run_dir)
    Run(run_dir).close()  # fail now, with Run's message, rather than on every request
    handler = type(
        "DashboardHandler",
        (_Handler, BaseHTTPRequestHandler),
        {"run_dir": run_dir, "refresh_ms": int(refresh_seconds * 1000)},
    )
    try:
        server = ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot serve on {HOST}:{port} ({err.strerror}); pick another "
            "port with --port N, or --port 0 for any free one",
        ) from err
    server.daemon_threads = True
    return server


def serve(
    run_dir: str | Path, port: int = 8050, *, refresh_seconds: float = 5.0, once: bool = False
) -> int:
    """Serve the dashboard of ``run_dir`` on http://127.0.0.1:PORT/ until Ctrl-C.

    Args:
        run_dir: the run to show (it may still be training).
        port: TCP port; 0 picks a free one, printed with the address.
        refresh_seconds: how often the page checks the run for new steps.
        once: answer one request and return (for tests and scripts).

    Returns:
        0 (after Ctrl-C, or after one request with ``once``).

    Raises:
        FileNotFoundError, ValueError, OSError: as :func:`make_server`.
    """
    server = make_server(run_dir, port, refresh_seconds=refresh_seconds)
    url = f"http://{HOST}:{server.server_address[1]}/"
    print(f"serving the dashboard of {run_dir} at {url}  (Ctrl-C stops)", flush=True)
    try:
        if once:
            server.handle_request()
        else:
            server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _state(run: Run) -> dict:
    return {"last_step": run.last_step(), "keys": len(run.keys()), "status": run.meta.get("status")}


def page(run_dir: str | Path, refresh_ms: int = 5000) -> str:
    """The dashboard page of ``run_dir`` as it is now, with the live-update script."""
    from ..analysis import analyze
    from ..dashboard import build, extra_figures, to_html
    from ..dashboard.links import DIV_ID, EXTRA_ID, META_KEY
    from ..store import Run

    with Run(run_dir) as run, run.reading_once():
        # the state first: steps committed while the page is built count as not yet seen
        state = json.dumps(_state(run)).replace("</", "<\\/")  # no "</script>" inside
        document = to_html(build(run, analyze(run)), *extra_figures(run))
        script = _SCRIPT.format(
            state=state, ms=int(refresh_ms), main=DIV_ID, extra=EXTRA_ID, meta=META_KEY
        )
    head, sep, tail = document.rpartition("</body>")
    return f"{head}{script}{sep}{tail}" if sep else document + script


def figure_json(run_dir: str | Path) -> str:
    """What a live page redraws from: ``{"state", "figure", "extras", "count", "items"}``:
    the run's state (as ``/status``), the dashboard and the extra figures as plotly JSON,
    and the findings list (number and ``<li>`` items)."""
    from ..analysis import analyze
    from ..dashboard import build, extra_figures
    from ..dashboard.links import META_KEY, findings_items
    from ..store import Run

    with Run(run_dir) as run, run.reading_once():
        state = _state(run)
        fig = build(run, analyze(run))
        extras = extra_figures(run)
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    count, items = findings_items(meta.get(META_KEY) or {})
    head = json.dumps({"state": state, "count": count, "items": items})
    figures = ",".join(e.to_json() for e in extras)
    return f'{head[:-1]}, "figure": {fig.to_json()}, "extras": [{figures}]}}'


class _Handler(_RequestHandler):
    """The dashboard's routes; :func:`make_server` puts ``BaseHTTPRequestHandler`` under it."""

    run_dir: Path
    refresh_ms: int

    def do_GET(self) -> None:
        from ..store import Run

        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page(self.run_dir, self.refresh_ms))
            elif path == "/figure.json":
                self._send(200, "application/json", figure_json(self.run_dir))
            elif path == "/status":
                with Run(self.run_dir) as run:
                    self._send(200, "application/json", json.dumps(_state(run)))
            else:
                self._send(404, "text/plain; charset=utf-8", f"no page {path}; the dashboard is /")
        except Exception as err:  # a half-written or removed run: say so, keep serving
            message = f"trainprobe could not read {self.run_dir}: {err}"
            body = f"<!doctype html><title>trainprobe</title><pre>{html.escape(message)}</pre>"
            self._send(500, "text/html; charset=utf-8", body)

    def _send(self, code: int, kind: str, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        """Quiet: the terminal shows the address, not every poll."""
