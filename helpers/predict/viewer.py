"""Notebook 03's attention viewer for one analysed study: choose a token group (a region, or every generated token),
a span of its tokens and a range of layers; the per-view maps are redrawn from the attention `analyze_study` kept,
with no model pass.

Widgets need a live front end that sends their changes back to the kernel. ipywidgets cannot tell whether one is
there (a papermill kernel has a comm manager like any other), but the kernel knows its client: headless runners
(papermill, nbconvert, CI) execute through nbclient, which declares that it cannot answer input requests
(`allow_stdin` false), while Jupyter, VS Code and Colab can. Without one the viewer shows the same pictures as a
static grid, one per token group over all layers.
"""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython import get_ipython
from IPython.display import display

from ..evaluate.plots import plot_attention_selection
from ..core.settings import in_colab


def interactive_frontend() -> bool:
    """Whether a front end is there to use widgets: Colab, or a kernel whose client can answer input()."""
    if in_colab():
        return True
    kernel = getattr(get_ipython(), "kernel", None)
    return kernel is not None and bool(kernel.get_parent().get("content", {}).get("allow_stdin"))


def token_groups(analysis: dict) -> dict[str, list[int]]:
    """Each region that wrote tokens, with its token indices, then every generated token."""
    regions = {region: idx for region, idx in analysis["region_tokens"].items() if idx}
    return {**regions, "all tokens": list(range(len(analysis["ids"])))}


def _show(fig) -> None:
    display(fig)
    plt.close(fig)  # shown once: the inline backend would show it again at the end of the cell


def attention_widget(analysis: dict) -> widgets.VBox:
    """The controls and the picture of the current choice; every change redraws it."""
    groups = token_groups(analysis)
    text, ends, n_layers = analysis["text"], analysis["char_ends"], analysis["attention"].shape[1]

    def labels(tokens):
        return [(f"{t}: {text[ends[t - 1] if t else 0:ends[t]]!r}", t) for t in tokens]

    group = widgets.Dropdown(options=list(groups), description="tokens of")
    first = groups[group.value]
    span = widgets.SelectionRangeSlider(options=labels(first), index=(0, len(first) - 1), description="span",
                                        layout=widgets.Layout(width="95%"))
    layers = widgets.IntRangeSlider(value=(0, n_layers - 1), min=0, max=n_layers - 1, description="layers")
    picture = widgets.Output()

    def redraw(_=None):
        start, stop = span.index
        with picture:
            picture.clear_output(wait=True)
            _show(plot_attention_selection(analysis, groups[group.value][start:stop + 1], layers.value, group.value))

    def regroup(_):
        tokens = groups[group.value]
        span.unobserve(redraw, "index")  # new options reset the span: draw once, with the whole group
        span.options, span.index = labels(tokens), (0, len(tokens) - 1)
        span.observe(redraw, "index")
        redraw()

    group.observe(regroup, "value")
    span.observe(redraw, "index")
    layers.observe(redraw, "value")
    redraw()
    return widgets.VBox([group, span, layers, picture])


def show_attention(analysis: dict, interactive: bool | None = None) -> None:
    """The viewer in a front end that runs widgets, else one picture per token group over all layers.
    `interactive` overrides the check (`interactive_frontend`)."""
    if interactive_frontend() if interactive is None else interactive:
        display(attention_widget(analysis))
        return
    n_layers = analysis["attention"].shape[1]
    print("no widget front end (headless run): one picture per token group, all layers")
    for name, tokens in token_groups(analysis).items():
        _show(plot_attention_selection(analysis, tokens, (0, n_layers - 1), name))
