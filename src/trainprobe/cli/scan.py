"""``trainprobe scan``: the live probes on a directory of checkpoints. Glue only.

``--model``, ``--data``, ``--loss`` and ``--optimizer`` name a function as
``package.module:function`` (imported like ``import package.module``: installed, or
under the current directory, which the command puts on ``sys.path`` as ``python -m``
does) or as ``path/to/file.py:function`` (the file is run as a module named after its
stem).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DESCRIPTION = """Run trainprobe's probes on a directory of saved checkpoints (.pt, .pth, .bin,
.safetensors) into a run directory that `trainprobe report` and `trainprobe dashboard`
read. A second scan of the same directory measures only checkpoints added since.
Exit code 0: every checkpoint measured; 1: some were skipped (listed with the reason);
2: bad arguments, or a failure that would repeat at every checkpoint (the model or the
loss raising before any checkpoint was measured, or two checkpoints failing the same
way), named once."""

EPILOG = """examples:
  trainprobe scan ckpts/ --model mypkg.models:build_model --data mypkg.data:val_batch
  trainprobe scan ckpts/ --model train.py:make_model --data train.py:batch --probes norms,hessian
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``scan`` on ``parser.add_subparsers()``; sets ``func=run``."""
    parser = subparsers.add_parser(
        "scan",
        help="measure a directory of saved checkpoints with the probes",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR")
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FUNCTION",
        help="builds the saved architecture: model = FUNCTION()",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="MODULE:FUNCTION",
        help="FUNCTION() gives the batch to evaluate on, e.g. (inputs, targets), or "
        "batches: a list of them, a DataLoader or another iterable (the first batch is "
        "used at every checkpoint)",
    )
    parser.add_argument(
        "--loss",
        metavar="MODULE:FUNCTION",
        help="loss(model, batch) -> scalar (default: cross-entropy)",
    )
    parser.add_argument(
        "--optimizer",
        metavar="MODULE:FUNCTION",
        help="optimizer(model) -> torch optimizer, loaded with the checkpoints' optimizer state",
    )
    parser.add_argument(
        "--probes", metavar="NAMES", help="comma-separated names (default: norms,hessian,regions)"
    )
    parser.add_argument(
        "--out", metavar="RUN_DIR", help="run directory (default: CKPT_DIR/trainprobe-scan)"
    )
    parser.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help="allow whole pickled models (runs code from the files: only for files you trust)",
    )
    parser.add_argument(
        "--train-mode",
        action="store_true",
        help="evaluate in train mode (dropout, BatchNorm batch stats)",
    )
    parser.add_argument(
        "--threads",
        type=_non_negative,
        default=0,
        help="torch CPU threads (default: 0, torch's choice)",
    )
    parser.set_defaults(func=run)
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def import_function(spec: str, option: str = "--model") -> Callable[..., Any]:
    """The callable named by ``package.module:function`` or ``path/to/file.py:function``.

    Raises:
        ValueError: no ``:``, the module or file cannot be imported, or it has no such
            callable (the message names ``option`` and the expected form).
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"{option} {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:build_model "
            "or path/to/train.py:build_model"
        )
    try:
        module = _import(module_name)
    except Exception as err:
        raise ValueError(
            f"{option} {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "check the module path, or give a file as path/to/file.py:function"
        ) from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(
            f"{option} {spec!r}: {module_name!r} has no callable {attr!r}"
            f"{'' if fn is None else f' (it is a {type(fn).__name__})'}"
        )
    return fn


def _import(name: str) -> Any:
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no file {name}")
    module_name = f"trainprobe_scan_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    """Run ``trainprobe scan``; 0 all measured, 1 some skipped, 2 bad arguments."""
    import torch

    from ..scan import scan

    _current_directory_importable()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        probes = None
        if args.probes:
            probes = [name.strip() for name in args.probes.split(",") if name.strip()]
        result = scan(
            args.ckpt_dir,
            model_fn=import_function(args.model, "--model"),
            data_fn=import_function(args.data, "--data"),
            loss_fn=import_function(args.loss, "--loss") if args.loss else None,
            optimizer_fn=(
                import_function(args.optimizer, "--optimizer") if args.optimizer else None
            ),
            probes=probes,
            run_dir=args.out,
            trust_checkpoints=args.trust_checkpoints,
            train_mode=args.train_mode,
        )
    except (OSError, ValueError, TypeError) as err:  # FileNotFound, Permission, RunInUse...
        print(f"trainprobe scan: error: {err}", file=sys.stderr)
        return 2
    print(_summary(result))
    return 0 if result.ok else 1


def _current_directory_importable() -> None:
    """Put the current directory first on ``sys.path``, as ``python -m`` does: a console
    script's ``sys.path`` starts with its own folder, so ``--model mymodule:build`` for a
    ``mymodule.py`` here would not import otherwise."""
    here = os.getcwd()
    if not any(entry in ("", here) for entry in sys.path):
        sys.path.insert(0, here)


def _summary(result: Any) -> str:
    lines = [f"scanned {len(result.scanned)} checkpoint(s) into {result.run_dir}"]
    if result.already:
        lines.append(f"{len(result.already)} already in the run (not measured again)")
    for name, reason in result.left_out.items():
        lines.append(f"probe {name} left out: {reason}")
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} checkpoint(s):")
        lines.extend(f"  {reason}" for reason in result.skipped.values())
    lines.append(f"next: trainprobe report {result.run_dir}")
    return "\n".join(lines)
