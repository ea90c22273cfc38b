"""Figure and widget builders for the book's notebooks (plotly + ipywidgets).

`setup_notebook()` picks a plotly renderer that works everywhere the book is read:
JupyterLab (plotly's MIME renderer), the built HTML (a div drawn by the site's own plotly.js,
loaded once per page, never a CDN) and Colab (its own renderer).
"""

from __future__ import annotations

import sys

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

RENDERER = "moe_book"


class BookRenderer(MimetypeRenderer):
    """Plotly JSON for live Jupyter front ends plus an HTML div for the static book.

    The HTML does not embed plotly.js: the book loads `plotly.min.js` once per page.
    """

    def to_mimebundle(self, fig_dict: dict) -> dict:
        return {
            "application/vnd.plotly.v1+json": fig_dict,
            "text/html": pio.to_html(fig_dict, include_plotlyjs=False, full_html=False,
                                     validate=False, config={"displaylogo": False}),
        }


def in_colab() -> bool:
    return "google.colab" in sys.modules


def setup_notebook() -> str:
    """Select the book's plotly renderer (Colab keeps its own). Returns the renderer's name."""
    pio.renderers[RENDERER] = BookRenderer()
    pio.renderers.default = "colab" if in_colab() else RENDERER
    pio.templates.default = "plotly_white"
    return pio.renderers.default
