"""Every figure the notebooks show, drawn inline and saved as PNG: training loss (02), attention and confidence (03),
GREEN (04). Each function takes its data and the PNG path and returns the figure; empty data draws a labelled,
empty panel instead of bare axes."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea, VPacker
from matplotlib.ticker import MaxNLocator

from ..model.attention import base_heatmaps
from ..metrics.clinical import COLUMNS as CLINICAL_COLUMNS
from ..core.data import REGIONS
from ..judge.judge import ERROR_CATEGORIES, green_scorer
from ..core.report_format import HEADERS
from ..core.runs import SPLIT_NAMES

# GREEN's clinically significant error categories (its `sub_categories`), short enough for an axis
ERROR_NAMES = {"a": "(a) false finding", "b": "(b) missed finding", "c": "(c) wrong location",
               "d": "(d) wrong severity", "e": "(e) false comparison", "f": "(f) missed comparison"}


def _save(fig, path, caption_height: float = 0.0):
    """Lay out (keeping the bottom `caption_height` of the figure for a caption) and save as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, caption_height, 1, 1))
    fig.savefig(path, dpi=120)
    return fig


def _nothing(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([]), ax.set_yticks([])


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ---- notebook 02
def plot_losses(metrics: dict, path):
    """Training and held-out loss over the whole run, the stages one after another with their boundaries named."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    offset = 0
    for stage in metrics["stages"]:
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            if stage[key]:
                ax.plot([offset + s for s, _ in stage[key]], [v for _, v in stage[key]], style,
                        label=f"{stage['name']} {'held-out' if key == 'eval_loss' else 'train'}")
        ax.axvline(offset, color="grey", lw=0.5)
        ax.annotate(f"stage {stage['stage']}: {stage['name']}", (offset, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=7, color="grey")
        offset += stage["global_step"]
    ax.set(xlabel="optimizer step (whole run)", ylabel="loss", title=f"{metrics['run']}: loss per stage")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        _nothing(ax, "no loss logged")
    return _save(fig, path)


# ---- notebook 03
def plot_shares(analysis: dict, path):
    """Share of attention on image tokens per layer, one line per region."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for region, df in analysis["shares"].groupby("region", sort=False):
        ax.plot(df["layer"], df["visual_share"], marker="o", label=f"{region} ({_count(df['n_tokens'].iloc[0], 'token')})")
    ax.set(xlabel="layer", ylabel="attention share on image tokens", ylim=(0, 1),
           title=f"{analysis['id']}: where each region's tokens look")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(analysis["shares"]):
        ax.legend(fontsize=8)
    else:
        _nothing(ax, "no region tokens generated")
    return _save(fig, path)


def _overlay(ax, image, heat, title: str):
    """One base-tile attention map over its X-ray; the tile is the whole image squashed to a square: the extent
    stretches it back."""
    width, height = image.size
    ax.imshow(image.convert("L"), cmap="gray", extent=(0, width, height, 0))
    shown = ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, width, height, 0), interpolation="bilinear")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return shown


def plot_heatmaps(analysis: dict, path, layers: str = "all layers", first_view: int = 1):
    """Rows = regions, columns = views (numbered from `first_view`): attention on the base tile stretched over the
    X-ray (sums to 1 per map)."""
    maps, views = analysis["heatmaps"], analysis["views"]
    if not maps:
        fig, ax = plt.subplots(figsize=(4, 2))
        _nothing(ax, "no region tokens generated")
        ax.set_title(analysis["id"])
        return _save(fig, path)
    fig, axes = plt.subplots(len(maps), len(views), figsize=(2.8 * len(views) + 0.6, 2.6 * len(maps)), squeeze=False)
    for row, (region, per_view) in enumerate(maps.items()):
        for col, (heat, image) in enumerate(zip(per_view, views)):
            shown = _overlay(axes[row, col], image, heat, f"{region} · view {col + first_view}")
        fig.colorbar(shown, ax=axes[row, -1], fraction=0.046, label="attention share")
    fig.suptitle(textwrap.fill(f"{analysis['id']}: attention on the base tile, mean over {layers}",  # one view: narrow
                               int(fig.get_figwidth() * 12)), fontsize=9)
    return _save(fig, path)


def plot_attention(analyses: list[dict], out_dir, layers=None) -> None:
    """Both attention figures of each analysed study: <id>_visual_share.png and <id>_heatmaps.png."""
    for analysis in analyses:
        plot_shares(analysis, Path(out_dir) / f"{analysis['id']}_visual_share.png")
        plot_heatmaps(analysis, Path(out_dir) / f"{analysis['id']}_heatmaps.png",
                      f"layers {layers}" if layers else "all layers")


def _line_spans(text: str, columns: int) -> list[tuple[int, int]]:
    """(start, end) in `text` of each line shown: its lines wrapped at `columns` characters, no character dropped."""
    spans, start = [], 0
    for line in text.split("\n"):
        for piece in textwrap.wrap(line, columns, drop_whitespace=False, replace_whitespace=False, expand_tabs=False,
                                   break_on_hyphens=False) or [""]:
            spans.append((start, start + len(piece)))
            start += len(piece)
        start += 1  # the newline
    return spans


MARK = {"boxstyle": "square,pad=0.1", "facecolor": "gold", "edgecolor": "none"}  # a highlighter's stroke


def _highlighted_text(ax, text: str, marked: np.ndarray, columns: int, size: float) -> None:
    """`text` in monospace, wrapped, with the characters where `marked` is set on a yellow background."""
    rows = []
    for start, end in _line_spans(text, columns):
        cuts = [start, *[i for i in range(start + 1, end) if marked[i] != marked[i - 1]], end]
        rows.append(HPacker(pad=0, sep=0, children=[
            TextArea(text[a:b] or " ", textprops={"family": "monospace", "size": size,
                                                  **({"bbox": MARK} if a < end and marked[a] else {})})
            for a, b in zip(cuts, cuts[1:])]))
    ax.add_artist(AnchoredOffsetbox("upper left", child=VPacker(pad=0, sep=2, children=rows), frameon=False,
                                    pad=0, borderpad=0))
    ax.axis("off")


def plot_attention_selection(analysis: dict, tokens: list[int], layers: tuple[int, int], label: str = "selection",
                             path=None):
    """One choice in notebook 03's attention viewer: the generated `tokens` highlighted in the report text and, per
    view, their attention on the base tile (`attention.base_heatmaps`: mean over the tokens and over layers
    `layers[0]`..`layers[1]`, inclusive; each map sums to 1) over the X-ray. Only the stored attention is read."""
    first, last = layers
    views, text, ends = analysis["views"], analysis["text"], analysis["char_ends"]
    maps = base_heatmaps(analysis["attention"], analysis["positions"], analysis["layouts"], {label: tokens},
                         layers=slice(first, last + 1)).get(label)
    marked = np.zeros(len(text) + 1, dtype=bool)
    for t in tokens:
        marked[ends[t - 1] if t else 0:ends[t]] = True
    width, size = max(6.0, 2.8 * len(views) + 0.6), 8
    columns = int(width * 72 / (0.6 * size)) - 6  # a monospace character is about 0.6 of the font size wide
    text_height = 0.35 + 0.17 * len(_line_spans(text, columns))
    fig = plt.figure(figsize=(width, text_height + 2.9))
    grid = fig.add_gridspec(2, len(views), height_ratios=[text_height, 2.9])
    text_ax = fig.add_subplot(grid[0, :])
    _highlighted_text(text_ax, text, marked, columns, size)
    span = f"token {tokens[0]}" if len(tokens) == 1 else f"tokens {tokens[0]}-{tokens[-1]}" if tokens else "no token"
    text_ax.set_title(f"{analysis['id']} · {label}: {span} highlighted", fontsize=9)
    for col, image in enumerate(views):
        ax = fig.add_subplot(grid[1, col])
        if maps is None:
            _nothing(ax, "no token chosen")
            ax.set_title(f"view {col + 1}", fontsize=8)
            continue
        shown = _overlay(ax, image, maps[col], f"view {col + 1}")
        fig.colorbar(shown, ax=ax, fraction=0.046, label="attention share" if col == len(views) - 1 else None)
    layer_range = f"layer {first}" if first == last else f"layers {first}-{last}"
    fig.suptitle(f"attention on the base tile, mean over the highlighted tokens and {layer_range}", fontsize=9)
    if path is None:  # the viewer: shown, not saved
        fig.tight_layout()
        return fig
    return _save(fig, path)


def plot_confidence_histogram(records: list[dict], path):
    """Histogram of each region's mean token probability in a predictions file (regions without tokens counted)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for region in REGIONS:
        values = [r["confidence"][region] for r in records if r["confidence"][region] is not None]
        ax.hist(values, bins=20, range=(0, 1), histtype="step",
                label=f"{region} (n={len(values)}, no tokens={len(records) - len(values)})")
    ax.set(xlabel="mean token probability of the region", ylabel="studies",
           title=f"Token confidence per region ({_count(len(records), 'study')})")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if records:
        ax.legend(fontsize=8)
    else:
        _nothing(ax, "no predictions")
    return _save(fig, path)


# ---- notebook 04
def _split_axes(n_splits: int):
    return plt.subplots(1, n_splits, figsize=(6 * n_splits, 3.8), squeeze=False, sharey=True)


def _headline_pairs(frame, system: str):
    """The system's parsed region pairs with a non-empty reference, and the splits (both: an empty one says so)."""
    return (frame[(frame.system == system) & frame.region.isin(REGIONS) & ~frame.ref_empty & frame.parsed],
            list(SPLIT_NAMES))


def plot_region_scores(tables: dict, runs: list[str], path):
    """Headline GREEN per region and whole report, one bar per run with its bootstrap 95% CI, the other systems
    (baselines) as horizontal marks; `tables`: {system: (table, ci)}."""
    splits = list(next(iter(tables.values()))[0].index)
    columns = list(next(iter(tables.values()))[0].columns)
    fig, axes = _split_axes(len(splits))
    width = 0.8 / len(runs)
    x = np.arange(len(columns))
    for ax, split in zip(axes[0], splits):
        drawn = False
        for i, run in enumerate(runs):
            table, ci = tables[run]
            means = table.loc[split, columns].to_numpy(float)
            lo = means - ci.loc[split, [f"{c} lo" for c in columns]].to_numpy(float)
            hi = ci.loc[split, [f"{c} hi" for c in columns]].to_numpy(float) - means
            ax.bar(x - 0.4 + (i + 0.5) * width, means, width, yerr=[lo, hi], capsize=3, label=run)
            drawn |= not np.isnan(means).all()
        for j, system in enumerate(s for s in tables if s not in runs):
            values = tables[system][0].loc[split, columns].to_numpy(float)
            ax.hlines(values, x - 0.45, x + 0.45, colors=f"C{len(runs) + j}", linestyles="--", label=system)
        ax.set_xticks(x, columns, rotation=20, ha="right")
        ax.set(title=f"{split}: GREEN (reference non-empty), 95% CI", ylim=(0, 1), xlim=(-0.6, len(columns) - 0.4))
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scored pairs", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[0][0].set_ylabel("mean GREEN")
    return _save(fig, path)


def plot_error_categories(frame, path, system: str):
    """Mean count of each clinically significant error type (a)-(f) per region, over scored headline pairs."""
    scored, splits = _headline_pairs(frame, system)
    fig, axes = _split_axes(len(splits))
    width = 0.8 / len(REGIONS)
    for ax, split in zip(axes[0], splits):
        part = scored[scored.split == split]
        ax.set_title(f"{SPLIT_NAMES[split]}: significant errors per pair ({_count(len(part), 'scored pair')})")
        if not len(part):
            _nothing(ax, "no scored pairs")
            continue
        for i, region in enumerate(REGIONS):
            counts = part[part.region == region][[f"error_{c}" for c in ERROR_CATEGORIES]].mean()
            ax.bar(np.arange(6) + i * width, counts.to_numpy(float), width, label=HEADERS[region])
        ax.set_xticks(np.arange(6) + width * 1.5, list(ERROR_NAMES.values()), rotation=25, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("mean count")
    fig.text(0.01, 0.01, "GREEN's categories: " + "; ".join(green_scorer().sub_categories), fontsize=6, wrap=True)
    return _save(fig, path, caption_height=0.08)


def plot_score_distribution(frame, path, system: str):
    """Histogram of per-pair GREEN (headline pairs) per region."""
    scored, splits = _headline_pairs(frame, system)
    fig, axes = _split_axes(len(splits))
    for ax, split in zip(axes[0], splits):
        part = scored[scored.split == split]
        ax.set(title=f"{SPLIT_NAMES[split]}: GREEN per pair ({_count(len(part), 'scored pair')})", xlabel="GREEN")
        if not len(part):
            _nothing(ax, "no scored pairs")
            continue
        for region in REGIONS:
            ax.hist(part[part.region == region].green, bins=np.linspace(0, 1, 11), histtype="step", linewidth=1.5,
                    label=HEADERS[region])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("pairs")
    return _save(fig, path)


def plot_confidence_vs_green(frame, path, system: str):
    """Token probability of each region (notebook 03) against GREEN and against false findings (a)."""
    scored = frame[(frame.system == system) & frame.region.isin(REGIONS) & frame.parsed & frame.confidence.notna()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for region in REGIONS:
        part = scored[scored.region == region]
        left.scatter(part.confidence, part.green, s=12, alpha=0.6, label=HEADERS[region])
    left.set(xlabel="mean token probability of the region", ylabel="GREEN",
             title=f"Confidence vs GREEN ({_count(len(scored), 'scored pair')})")
    groups = [scored.confidence[scored.error_a == 0], scored.confidence[scored.error_a > 0]]
    right.set(ylabel="mean token probability", title="Do false findings come with lower token probability?")
    if not len(scored):
        _nothing(left, "no scored pairs")
        _nothing(right, "no scored pairs")
        return _save(fig, path)
    left.legend(fontsize=8)
    right.boxplot([g.to_numpy(float) for g in groups])
    right.set_xticks([1, 2], [f"no false finding (n={len(groups[0])})", f"false finding (n={len(groups[1])})"])
    return _save(fig, path)


def plot_clinical(table, runs: list[str], path, split: str = "test"):
    """RadEval's metrics (`clinical.clinical_table`), one panel each: every system's value on `split` with its 95%
    interval; runs filled, baselines hatched."""
    part = table.xs(SPLIT_NAMES[split], level="split")
    columns = (len(CLINICAL_COLUMNS) + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=(3 * columns, 6), squeeze=False)
    for ax, column in zip(axes.flat, CLINICAL_COLUMNS):
        values = part[column].to_numpy(dtype=float)
        errors = np.abs(part[[f"{column} lo", f"{column} hi"]].to_numpy(dtype=float).T - values)
        bars = ax.bar(range(len(part)), np.nan_to_num(values), yerr=np.nan_to_num(errors), capsize=3, color="C0")
        for bar, system in zip(bars, part.index):
            if system not in runs:
                bar.set(hatch="//", facecolor="white", edgecolor="C0")
        ax.set_title(column, fontsize=9)
        ax.set_xticks(range(len(part)), part.index, rotation=45, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(CLINICAL_COLUMNS):]:
        ax.remove()
    fig.suptitle(f"RadEval metrics, {SPLIT_NAMES[split]}, whole reports" +
                 (" (random stand-in checkpoints: meaningless)" if part.Checkpoints.str.startswith("random").any()
                  else ""))
    return _save(fig, path)
