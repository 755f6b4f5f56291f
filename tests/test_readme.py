"""The README's key tables are the probes' declarations (DESIGN.md §2: keys are data)."""

from __future__ import annotations

from tests.readme_keys import BLOCK, README, synced
from trainprobe.probes import PROBES


def test_the_readme_key_tables_are_rendered_from_the_declarations():
    text = README.read_text()
    assert text == synced(text), "README key tables are stale: run python -m tests.readme_keys"


def test_every_probe_has_its_keys_in_the_readme():
    listed = {name for m in BLOCK.finditer(README.read_text()) for name in m["names"].split()}
    assert listed == {cls.__name__ for cls in PROBES.values()}
