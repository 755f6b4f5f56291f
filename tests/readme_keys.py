"""The README's key tables, rendered from the probes' own declarations.

Each table sits between ``<!-- keys: ClassA ClassB -->`` and ``<!-- /keys -->`` in
README.md; ``python -m tests.readme_keys`` rewrites them from the classes' ``keys`` and
default schedules, and tests/test_readme.py fails while the README is out of date.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trainprobe.probes as probes

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- keys: (?P<names>[A-Za-z ]+) -->\n)(?P<body>.*?)(<!-- /keys -->)", re.S)


def table(class_names: list[str]) -> str:
    """A markdown table: each probe with its default schedule, one row per declared key."""
    rows = ["| probe (default schedule) | key | meaning |", "|---|---|---|"]
    for class_name in class_names:
        cls = getattr(probes, class_name)
        schedule = cls.__dataclass_fields__["schedule"].default.describe()
        for i, key in enumerate(cls.keys):
            probe = f"`{class_name}` ({schedule})" if i == 0 else ""
            meaning = re.sub(r"<[a-z_]+>", r"`\g<0>`", key.meaning.replace("|", "\\|"))
            rows.append(f"| {probe} | `{key.pattern}` | {meaning} |")
    return "\n".join(rows) + "\n"


def synced(text: str) -> str:
    """``text`` with every key block rendered afresh."""
    return BLOCK.sub(lambda m: m[1] + table(m["names"].split()) + m[4], text)


if __name__ == "__main__":
    README.write_text(synced(README.read_text()))
    sys.exit(0)
