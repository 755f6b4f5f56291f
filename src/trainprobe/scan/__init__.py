"""Offline analysis: the live probes run on a directory of saved checkpoints."""

from .checkpoints import (
    SUFFIXES,
    Checkpoint,
    CheckpointError,
    find_checkpoint_files,
    load_checkpoint,
)
from .probes import DEFAULT_SCAN_PROBES, default_scan_probes, probes_from_names
from .scan import ScanResult, scan
from .setup import first_batch
from .update import CheckpointUpdate

__all__ = [
    "DEFAULT_SCAN_PROBES",
    "SUFFIXES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointUpdate",
    "ScanResult",
    "default_scan_probes",
    "find_checkpoint_files",
    "first_batch",
    "load_checkpoint",
    "probes_from_names",
    "scan",
]
