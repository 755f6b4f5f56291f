"""The record key is the only contract between probes, detectors and panels (DESIGN.md §2)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest

from trainprobe.analysis import DETECTORS
from trainprobe.dashboard import PANELS
from trainprobe.probes import default_probes
from trainprobe.store import Run

from .cases import train


@pytest.fixture(scope="module")
def default_keys(tmp_path_factory) -> list[str]:
    run_dir = tmp_path_factory.mktemp("keys") / "run"
    train("cnn", steps=3, probes=default_probes(every_n=1), run_dir=run_dir)
    return Run(run_dir).keys()


@pytest.mark.parametrize(
    "consumer", [*DETECTORS, *PANELS], ids=lambda c: f"{type(c).__name__}:{c.name}"
)
def test_default_probes_produce_every_key_a_consumer_needs(default_keys, consumer):
    for pattern in consumer.needs:
        assert any(fnmatchcase(k, pattern) for k in default_keys), (
            f"{consumer.name} needs {pattern!r}, which the default probes (plus a logged loss) "
            "do not write"
        )
