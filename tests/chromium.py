"""How the browser tests and ``benchmarks/dashboard.py`` start Debian's chromium."""

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
