"""Interactive Plotly dashboard of a run, with the findings marked on it.

``build(run, findings)`` stacks every :data:`PANELS` entry that has data as one
row over a shared training-step axis; ``to_html(fig, *extra_figures(run))`` makes
one self-contained page that works offline (the extra figures have no step axis:
the group cosine matrix with a step slider). Builders read the run only; the CLI writes the file.
"""

from .figure import build, extra_figures, to_html
from .panels import PANELS
from .parts import Panel, PanelPart

__all__ = ["PANELS", "Panel", "PanelPart", "build", "extra_figures", "to_html"]
