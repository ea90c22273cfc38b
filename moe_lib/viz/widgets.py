"""One figure function, two front ends: a live ipywidgets control and a static plotly slider.

A chapter writes `make_figure(**params) -> go.Figure` once. `live(make_figure, **controls)` redraws
it from ipywidgets in a running kernel; `static_slider(make_figure, name, values, **fixed)`
precomputes it for every value of one parameter and stacks the results into a single figure with a
plotly slider, so a reader of the static site can still move the slider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import plotly.graph_objects as go


def static_slider(make_figure: Callable[..., go.Figure], name: str, values: Sequence,
                  label: str | None = None, active: int = 0, **fixed) -> go.Figure:
    """A figure with one slider step per value of `name`; each step shows that value's traces.

    Every call of `make_figure` must return the same number of traces in the same layout.
    """
    if not values:
        raise ValueError("static_slider needs at least one value")
    figures = [make_figure(**{name: v}, **fixed) for v in values]
    n_traces = len(figures[0].data)
    if any(len(f.data) != n_traces for f in figures):
        raise ValueError("make_figure must return the same number of traces for every value")
    combined = go.Figure(layout=figures[active].layout)
    for i, fig in enumerate(figures):
        for trace in fig.data:
            trace.visible = i == active
            combined.add_trace(trace)
    steps = []
    for i, (value, fig) in enumerate(zip(values, figures, strict=True)):
        visible = [j // n_traces == i for j in range(n_traces * len(values))]
        step_title = fig.layout.title.text if fig.layout.title else None
        relayout = {"title.text": step_title} if step_title else {}
        steps.append({"method": "update", "label": str(value),
                      "args": [{"visible": visible}, relayout]})
    combined.update_layout(sliders=[{"active": active, "steps": steps, "pad": {"t": 40},
                                     "currentvalue": {"prefix": f"{label or name} = "}}])
    return combined


def live(make_figure: Callable[..., go.Figure], **controls):
    """An ipywidgets panel that redraws `make_figure(**values)` whenever a control changes.

    `controls` maps parameter names of `make_figure` to ipywidgets controls. The figure goes into
    an `Output` widget (no FigureWidget, which is unreliable in Colab) as the widget's own
    display data: not printed through `fig.show()` (plotly publishes straight to the cell), so
    executing a notebook stores only the widget placeholder. Each control's label is shown in full.
    Return value: the panel (leave it as the cell's last expression to display it).
    """
    import ipywidgets as widgets

    output = widgets.Output()

    def redraw(_change=None) -> None:
        figure = make_figure(**{k: w.value for k, w in controls.items()})
        output.outputs = ({"output_type": "display_data", "data": figure._repr_mimebundle_(),
                           "metadata": {}},)

    for control in controls.values():
        control.style.description_width = "initial"  # the default width cuts off labels longer than ~10 chars
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values())), output])
