"""Notebook 03's attention viewer: the picture of one choice, the widget's wiring, the check for a front end and the
static fallback."""
import sys
import types

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from helpers.evaluate import plots
from helpers.predict import viewer

TEXT = "Lung: Lungs are clear.\nHeart: Normal."
ENDS = [5, 11, 15, 22, 29, 36]  # "Lung:", " Lungs", " are", " clear.", "\nHeart:", " Normal."
N_LAYERS = 4
POSITIONS = [np.arange(2, 6), np.arange(7, 11)]  # two views, each a 2x2 base tile; the other keys are text


@pytest.fixture
def analysis():
    attention = np.random.default_rng(0).random((len(ENDS), N_LAYERS, 14)).astype(np.float32)
    return {"id": "s1", "views": [Image.new("RGB", (40, 50)), Image.new("RGB", (60, 50))], "text": TEXT,
            "char_ends": ENDS, "ids": list(range(len(ENDS))), "attention": attention, "positions": POSITIONS,
            "layouts": [{"base": np.arange(4).reshape(2, 2), "n_tokens": 4}] * 2,
            "region_tokens": {"lung": [1, 2, 3], "heart": [5], "mediastinal": [], "bone": []}}


def highlighted(fig) -> str:
    return "".join(t.get_text() for t in fig.findobj(Text) if t.get_bbox_patch() is not None)


def shown_maps(fig) -> list[np.ndarray]:
    views = sorted((ax for ax in fig.axes if ax.get_title().startswith("view")), key=lambda ax: ax.get_title())
    return [np.asarray(ax.images[1].get_array()) for ax in views]


def test_the_picture_shows_the_chosen_layers_mean_and_highlights_the_tokens(analysis, tmp_path):
    tokens, layers = [3, 4], (1, 2)
    fig = plots.plot_attention_selection(analysis, tokens, layers, "lung", tmp_path / "selection.png")
    assert (tmp_path / "selection.png").is_file()
    assert highlighted(fig) == " clear.Heart:"  # the two tokens' characters; the newline between them breaks the line
    mean = analysis["attention"][tokens][:, 1:3].mean(axis=(0, 1))  # over the tokens and layers 1 and 2
    for view, shown in zip(POSITIONS, shown_maps(fig)):
        expected = mean[view].reshape(2, 2)
        assert shown == pytest.approx(expected / expected.sum())
    assert "layers 1-2" in fig._suptitle.get_text() and "tokens 3-4" in fig.axes[0].get_title()

    one = plots.plot_attention_selection(analysis, [0], (3, 3), "all tokens")
    assert highlighted(one) == "Lung:" and "layer 3" in one._suptitle.get_text()
    last_layer = analysis["attention"][0, 3]
    assert shown_maps(one)[1] == pytest.approx(last_layer[POSITIONS[1]].reshape(2, 2) / last_layer[POSITIONS[1]].sum())

    empty = plots.plot_attention_selection(analysis, [], (0, 3))
    assert highlighted(empty) == "" and "no token chosen" in " ".join(t.get_text() for t in empty.findobj(Text))
    plt.close("all")


def test_the_widget_redraws_each_choice_from_the_stored_attention(analysis, monkeypatch):
    drawn = []

    def draw(analysis, tokens, layers, label):
        drawn.append((tokens, layers, label))
        return plt.figure()

    monkeypatch.setattr(viewer, "plot_attention_selection", draw)
    group, span, layers, _ = viewer.attention_widget(analysis).children
    assert list(group.options) == ["lung", "heart", "all tokens"]  # regions without tokens are left out
    assert [label for label, _ in span.options] == ["1: ' Lungs'", "2: ' are'", "3: ' clear.'"]
    assert drawn == [([1, 2, 3], (0, N_LAYERS - 1), "lung")]  # at first: the first region, all layers
    layers.value = (1, 2)
    span.index = (1, 1)
    group.value = "all tokens"  # a new group starts with all its tokens, drawn once
    assert drawn[1:] == [([1, 2, 3], (1, 2), "lung"), ([2], (1, 2), "lung"), (list(range(6)), (1, 2), "all tokens")]


def test_a_front_end_is_colab_or_a_client_that_answers_input(monkeypatch):
    assert not viewer.interactive_frontend()  # plain Python: no kernel at all

    def shell(allow_stdin):
        kernel = types.SimpleNamespace(get_parent=lambda: {"content": {"code": "...", "allow_stdin": allow_stdin}})
        return lambda: types.SimpleNamespace(kernel=kernel)

    monkeypatch.setattr(viewer, "get_ipython", shell(False))  # what nbclient (papermill, nbconvert) sends
    assert not viewer.interactive_frontend()
    monkeypatch.setattr(viewer, "get_ipython", shell(True))  # Jupyter, VS Code
    assert viewer.interactive_frontend()
    monkeypatch.setattr(viewer, "get_ipython", lambda: None)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert viewer.interactive_frontend()


def test_without_a_front_end_the_same_pictures_come_as_a_static_grid(analysis, monkeypatch):
    shown = []
    monkeypatch.setattr(viewer, "display", shown.append)
    viewer.show_attention(analysis)  # no kernel here: the fallback
    assert [fig.axes[0].get_title() for fig in shown] == [
        "s1 · lung: tokens 1-3 highlighted", "s1 · heart: token 5 highlighted", "s1 · all tokens: tokens 0-5 highlighted"]
    assert all(f"layers 0-{N_LAYERS - 1}" in fig._suptitle.get_text() for fig in shown)
    assert not plt.get_fignums()  # each picture shown once, then closed
    shown.clear()
    viewer.show_attention(analysis, interactive=True)
    assert type(shown[-1]).__name__ == "VBox"  # (outside a kernel its Output cannot capture the first picture)
