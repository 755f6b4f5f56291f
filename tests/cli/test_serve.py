"""`trainprobe dashboard --serve`: a localhost page that follows the run as it is written."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from trainprobe.cli import serve as serve_cli
from trainprobe.store import Record, RunWriter


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode("utf-8")


@pytest.fixture
def live_run(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.append(Record(int(s), {"scalars/loss": 2.0 - s / 100}) for s in range(20))
    yield writer
    writer.close()


def test_page_follows_the_run_between_fetches(live_run):
    server = serve_cli.make_server(live_run.run_dir, 0, refresh_seconds=2)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        first = _get(base + "/")
        assert "plotly" in first and 'fetch("/status"' in first and "every = 2000" in first
        assert 'fetch("/figure.json"' in first
        assert json.loads(_get(base + "/status"))["last_step"] == 19
        assert '"name":"accuracy"' not in first
        live_run.append(
            Record(s, {"scalars/loss": 1.0, "scalars/accuracy": 0.5}) for s in range(20, 40)
        )
        assert json.loads(_get(base + "/status"))["last_step"] == 39  # what the page polls
        second = _get(base + "/")
        assert '"last_step": 39' in second and '"last_step": 19' in first
        assert '"name":"accuracy"' in second  # the new series is drawn
        data = json.loads(_get(base + "/figure.json"))  # what the page redraws from
        assert data["state"]["last_step"] == 39
        assert "accuracy" in [trace.get("name") for trace in data["figure"]["data"]]
        assert data["figure"]["layout"]["uirevision"] == "trainprobe"  # zoom survives react
        assert data["extras"] == [] and isinstance(data["count"], int)
        with pytest.raises(urllib.error.HTTPError) as missing:
            _get(base + "/nope")
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_once_prints_the_free_port(live_run, capsys):
    thread = threading.Thread(
        target=serve_cli.serve, args=(live_run.run_dir, 0), kwargs={"once": True}, daemon=True
    )
    thread.start()
    deadline, printed = time.monotonic() + 30, ""
    while "http://127.0.0.1:" not in printed and time.monotonic() < deadline:
        time.sleep(0.05)
        printed += capsys.readouterr().out
    url = printed.split("at ", 1)[1].split()[0]
    assert int(url.rsplit(":", 1)[1].strip("/")) > 0
    assert json.loads(_get(url + "status"))["keys"] == 1
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_errors(tmp_path, live_run):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serve_cli.make_server(tmp_path / "missing")
    with pytest.raises(ValueError, match="refresh_seconds must be positive"):
        serve_cli.make_server(live_run.run_dir, refresh_seconds=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="--port 0 for any free one"):
            serve_cli.make_server(live_run.run_dir, taken.getsockname()[1])


def test_arguments():
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(["--serve", "--port", "0"])
    assert (args.serve, args.port, args.refresh) == (True, 0, 5.0)
    assert parser.parse_args([]).serve is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--port", "70000"])


def test_unreadable_run_answers_500_and_keeps_serving(live_run):
    server = serve_cli.make_server(live_run.run_dir, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        server.RequestHandlerClass.run_dir = live_run.run_dir / "gone"
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(base + "/")
        assert err.value.code == 500 and "could not read" in err.value.read().decode()
        server.RequestHandlerClass.run_dir = live_run.run_dir
        assert json.loads(_get(base + "/status"))["last_step"] == 19
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    np.testing.assert_equal(thread.is_alive(), False)


def test_the_page_script_cannot_be_closed_by_the_runs_status(tmp_path):
    """The run's state goes into the page's <script> as JSON: a status holding
    "</script>" must not end that script early."""
    writer = RunWriter(tmp_path / "run")
    writer.set_meta({"status": "</script><b>x</b>"})
    writer.append([Record(0, {"scalars/loss": 1.0})])
    writer.close()
    document = serve_cli.page(tmp_path / "run")
    script = document[document.rindex("<script>") :]
    assert "</script><b>x" not in script and "<\\/script><b>x" in script
