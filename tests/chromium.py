"""How the browser tests and ``benchmarks/dashboard.py`` find and start Debian's chromium.

Nothing here installs it: ``.ci/run`` does (``apt-get install chromium``) when it is missing.
"""

from __future__ import annotations

import os
import shutil

NAMES = ("chromium", "chromium-browser")
"""Executable names looked up on PATH, in order."""
FALLBACK = "/usr/bin/chromium"
"""Where Debian's package puts it, for a PATH without ``/usr/bin``."""

BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Headless, and no background connections (refused here: the network is closed)."""


def find_chromium() -> str | None:
    """The chromium executable: the first of :data:`NAMES` on PATH, else :data:`FALLBACK`
    when it is an executable file; ``None`` when there is none."""
    found = next((path for name in NAMES if (path := shutil.which(name))), None)
    if found:
        return found
    if os.path.isfile(FALLBACK) and os.access(FALLBACK, os.X_OK):
        return FALLBACK
    return None


def missing_reason() -> str:
    """Why there is no browser, and how to get one: the browser tests' skip message."""
    return (
        f"chromium is not installed (no {' or '.join(NAMES)} on PATH, no {FALLBACK}); "
        "`.ci/run` installs it with apt-get when it can, or run "
        "`apt-get install -y chromium` yourself"
    )
