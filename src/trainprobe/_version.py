"""The installed version of trainprobe (one place; the package and the run metadata read it)."""

__version__ = "0.1.0"
