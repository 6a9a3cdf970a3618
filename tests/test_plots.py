"""Every figure on empty and on normal input: it renders, is saved, and every panel has a title and axis labels."""
import math

import numpy as np
import pandas as pd
import pytest

from helpers.evaluate import plots
from helpers.core.data import REGIONS
from helpers.judge.judge import ERROR_CATEGORIES


def labelled(fig):
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    return all(ax.get_title() for ax in axes if ax.has_data() or ax.texts) and fig.axes


def metrics(n):
    return {"run": "r", "stages": [{"stage": i + 1, "name": f"s{i}", "global_step": n,
                                    "loss": [[s, 3.0 - s / 10] for s in range(1, n + 1)],
                                    "eval_loss": [[n, 2.5]] if n else []} for i in range(2)]}


def analysis(with_tokens):
    from PIL import Image

    shares = pd.DataFrame([{"region": "lung", "layer": layer, "visual_share": 0.3, "non_visual_share": 0.7,
                            "n_tokens": 1} for layer in range(3)] if with_tokens else [],
                          columns=["region", "layer", "visual_share", "non_visual_share", "n_tokens"])
    heat = {"lung": [np.full((4, 4), 1 / 16)] * 2} if with_tokens else {}
    return {"id": "s1", "shares": shares, "heatmaps": heat, "views": [Image.new("RGB", (40, 50))] * 2}


def frame(n):
    rows = []
    for i in range(n):
        for split in ("val", "test"):
            for region in REGIONS:
                rows.append({"system": "model", "split": split, "id": f"s{i}", "region": region,
                             "ref_empty": False, "parsed": True, "green": i / max(n, 1), "confidence": 0.5 + i / 10,
                             **{f"error_{c}": i % 2 for c in ERROR_CATEGORIES}})
    return pd.DataFrame(rows, columns=["system", "split", "id", "region", "ref_empty", "parsed", "green",
                                       "confidence", *[f"error_{c}" for c in ERROR_CATEGORIES]])


def tables(value):
    columns = ["Lung", "Heart", "Mediastinal", "Bone", "Mean", "Whole report"]
    table = pd.DataFrame([[value] * 6] * 2, index=["Validation", "Testing"], columns=columns)
    ci = pd.DataFrame([[value] * 12] * 2, index=["Validation", "Testing"],
                      columns=[f"{c} {e}" for c in columns for e in ("lo", "hi")])
    return {"model": (table, ci), "template": (table, ci)}


@pytest.mark.parametrize("empty", [True, False])
def test_every_plot_renders_with_titles(tmp_path, empty):
    n = 0 if empty else 3
    records = [{"id": str(i), "confidence": {k: (0.2 * i if k != "bone" else None) for k in REGIONS}} for i in range(n)]
    figures = {
        "loss": plots.plot_losses(metrics(n), tmp_path / "loss.png"),
        "shares": plots.plot_shares(analysis(not empty), tmp_path / "shares.png"),
        "heatmaps": plots.plot_heatmaps(analysis(not empty), tmp_path / "heat.png", "layers 1-2"),
        "confidence": plots.plot_confidence_histogram(records, tmp_path / "confidence.png"),
        "regions": plots.plot_region_scores(tables(math.nan if empty else 0.5), ["model"], tmp_path / "regions.png"),
        "errors": plots.plot_error_categories(frame(n), tmp_path / "errors.png", "model"),
        "scores": plots.plot_score_distribution(frame(n), tmp_path / "scores.png", "model"),
        "confidence_vs_green": plots.plot_confidence_vs_green(frame(n), tmp_path / "cvg.png", "model"),
    }
    for name, fig in figures.items():
        assert labelled(fig), name
    assert len(list(tmp_path.glob("*.png"))) == len(figures)
    texts = {name: " ".join(t.get_text() for ax in fig.axes for t in ax.texts) for name, fig in figures.items()}
    if empty:  # an empty panel says so instead of drawing bare axes
        assert "no scored pairs" in texts["regions"] and "no scored pairs" in texts["errors"]
        assert "no region tokens generated" in texts["shares"] + texts["heatmaps"]
    else:
        labels = [t.get_text() for t in figures["errors"].axes[0].get_xticklabels()]
        assert labels == list(plots.ERROR_NAMES.values())  # short names, whole words
        assert "(1 token)" in " ".join(t.get_text() for t in figures["shares"].axes[0].get_legend().get_texts())
        assert any(ax.get_label() == "<colorbar>" for ax in figures["heatmaps"].axes)
        dashed = figures["regions"].axes[0].collections  # the baseline ("template") as marks, the run as bars
        assert len(figures["regions"].axes[0].patches) == 6 and any(c.get_label() == "template" for c in dashed)
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in figures["confidence"].axes)
