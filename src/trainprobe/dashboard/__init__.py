"""Interactive Plotly dashboard of a run, with the findings marked on it.

``build(run, findings)`` stacks every :data:`PANELS` entry that has data as one
row over a shared training-step axis; ``to_html(fig)`` makes one self-contained
page that works offline. Builders read the run only; the CLI writes the file.
"""

from .figure import build, to_html
from .panels import PANELS
from .parts import Panel, PanelPart

__all__ = ["PANELS", "Panel", "PanelPart", "build", "to_html"]
