"""The local-complexity row: how many neurons change state near train, test and random
points over training (the ``regions/<set>/total`` keys of LocalComplexity). The per-layer
counts and the exact segment pieces go to the catch-all row (:mod:`.catch_all`)."""

from __future__ import annotations

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from .curves import _coloured, _read
from .parts import HELDOUT_COLOUR, TRAIN_COLOUR, PanelPart

REGIONS, TOTAL = "regions", "total"
"""Keys ``regions/<set>/total``: the mean count over one set of points."""
REGION_SETS = ("train", "test", "random")
SET_COLOURS = {"train": TRAIN_COLOUR, "test": HELDOUT_COLOUR, "random": "#7f7f7f"}
"""One colour per point set, the same as train / held-out accuracy: test points are held out."""

LOCAL_COMPLEXITY_NEEDS = (f"{REGIONS}/*/{TOTAL}",)  # one glob: a run may record any of the sets


def local_complexity_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``regions/<set>/total`` for train, test and random points, one colour per set
    (:data:`SET_COLOURS`); markers show the (usually log-spaced) measurements."""
    keys = [f"{REGIONS}/{point_set}/{TOTAL}" for point_set in REGION_SETS]
    series = _read(run, [k for k in keys if k in run])
    if not series:
        return None
    traces = []
    for s in series:
        point_set = s.key.split("/")[1]
        traces.append(_coloured(s, f"regions · {point_set}", SET_COLOURS[point_set]))
        traces[-1].update(mode="lines+markers", marker={"size": 4})
    return PanelPart(
        traces,
        "neurons cut",
        "Neurons whose ReLU state changes near each point (mean over the set). Falling "
        "near train points: regions migrate away from the data, as the network groks "
        "(Humayun et al. 2024).",
        keys=tuple(s.key for s in series),
    )
