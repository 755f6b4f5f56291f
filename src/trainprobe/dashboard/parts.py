"""The two types of the dashboard, a :class:`Panel` and the :class:`PanelPart` it returns,
and the constants that several panels share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from plotly.basedatatypes import BaseTraceType

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from ..analysis.update_ratio import HEALTHY

ROW_PX = 200
"""Pixels of figure height per unit of :attr:`PanelPart.height`."""

# Rule of thumb from A. Karpathy's CS231n notes ("Neural Networks Part 3: Learning and
# Evaluation", ratio of weights:updates): ||dw|| / ||w|| per step "should be somewhere
# around 1e-3"; much higher means the learning rate is too high, much lower too low.
# One number for the detector and the picture: the update_ratio detector's.
HEALTHY_UPDATE_RATIO = HEALTHY
"""Typical ``||dw|| / ||w||`` per step of a healthy run: the update-ratio heatmap's white
centre and the reference line of the global-norms panel."""

FRACTION = (-0.03, 1.03)
"""The y range of rows in ``[0, 1]`` (a margin so that 0 and 1 stay visible)."""
TRAIN_COLOUR, HELDOUT_COLOUR = "#1f77b4", "#ff7f0e"
"""Train and held-out data, the same colour on every row that shows both."""

PanelFunc = Callable[[Run, tuple[Finding, ...]], "PanelPart | None"]


@dataclass(frozen=True)
class MenuItem:
    """One choice of a row's menu: which of the row's traces it shows, and its y-axis.

    Attributes:
        label: the menu text.
        traces: indices into :attr:`PanelPart.traces` shown by this choice (the rest of
            the row's traces are hidden).
        y_title: the y-axis title while it is chosen.
        y_axis: y-axis settings while it is chosen (e.g. ``type``, ``autorange``).
        description: the row's one-line explanation while it is chosen ('' keeps the
            row's own).
    """

    label: str
    traces: tuple[int, ...]
    y_title: str = ""
    y_axis: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class PanelPart:
    """What one panel draws: one row of the dashboard.

    Attributes:
        traces: the Plotly traces of the row, all over x = training step.
        y_title: the y-axis title.
        description: one line saying what the row shows and how to read it.
        keys: the record keys the traces were read from; a finding whose
            ``keys`` name one of them puts a marker on the panel title.
        y_log: a log10 y-axis.
        height: relative row height (1.0 is about ``ROW_PX`` pixels).
        y_axis: further y-axis settings (e.g. ``tickvals``/``ticktext`` for
            shortened layer names, ``autorange="reversed"``).
        menu: when given, a menu over the row picks which traces show; the first
            item is shown first, and ``y_title``/``y_axis`` should be its.
    """

    traces: tuple[BaseTraceType, ...]
    y_title: str
    description: str
    keys: tuple[str, ...] = ()
    y_log: bool = False
    height: float = 1.0
    y_axis: Mapping[str, Any] = field(default_factory=dict)
    menu: tuple[MenuItem, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "traces", tuple(self.traces))
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "menu", tuple(self.menu))
        for item in self.menu:
            if not isinstance(item, MenuItem):
                raise TypeError(f"PanelPart.menu holds MenuItem, got {type(item).__name__}")
            if not item.traces or not all(0 <= i < len(self.traces) for i in item.traces):
                raise ValueError(
                    f"menu item {item.label!r} shows traces {item.traces}; it needs at least "
                    f"one, each an index into the row's {len(self.traces)} traces"
                )
        if not self.traces:
            raise ValueError(
                "PanelPart needs at least one trace; return None from the panel "
                "function when its data is missing"
            )
        bad = [t for t in self.traces if not isinstance(t, BaseTraceType)]
        if bad:
            raise TypeError(
                f"PanelPart.traces must be plotly traces (go.Scatter, go.Heatmap, "
                f"...), got {type(bad[0]).__name__}"
            )
        if not self.height > 0:
            raise ValueError(f"PanelPart.height must be > 0, got {self.height}")


@dataclass(frozen=True)
class Panel:
    """One row kind of the dashboard.

    Attributes:
        name: identifier in lower_snake (e.g. ``"grad_heatmap"``).
        title: the row title shown above it.
        func: ``func(run, findings) -> PanelPart | None``; ``None`` when the run
            lacks its data, and the row is then left out.
        needs: ``fnmatch`` patterns of the record keys ``func`` reads.
    """

    name: str
    title: str
    func: PanelFunc
    needs: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Panel.name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.title, str):
            raise TypeError(f"Panel.title must be a str, got {type(self.title).__name__}")
        if not callable(self.func):
            raise TypeError(
                f"Panel.func must be callable as func(run, findings), got "
                f"{type(self.func).__name__}"
            )
        if not isinstance(self.needs, tuple) or not all(isinstance(p, str) for p in self.needs):
            raise TypeError(
                f"Panel.needs must be a tuple of key patterns (str), e.g. "
                f"('norms/grad/*',), got {self.needs!r}"
            )

    def draw(self, run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
        """Call :attr:`func` and check that it kept to its contract."""
        part = self.func(run, findings)
        if part is not None and not isinstance(part, PanelPart):
            raise TypeError(
                f"panel {self.name!r} returned {type(part).__name__}; a panel "
                "function must return a PanelPart or None"
            )
        return part
