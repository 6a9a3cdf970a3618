"""Does the model look at the X-ray? Notebook 03 writes the test studies' reports again, same prompts, with the views
replaced by blank ones at the studies' mean grey or by another study's views (a seeded derangement); notebook 04
counts the region texts that did not change (no judge call) and judges the ablated reports like the real ones, with
the paired difference against the real views. A model that writes the same report either way does not look."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from ..core.data import study_images
from ..model.generation import generate_split, load_predictions
from .green import COLUMNS, SCORED, evaluate as judge_systems, paired_differences, region_stats
from ..core.report_format import REPORT, whole_report
from ..core.runs import SPLIT_NAMES
from ..core.storage import atomic_write_text

ABLATIONS = ("blank", "shuffled")
ABLATION_WORDS = {"blank": "blank views", "shuffled": "another study's views"}
SPLIT = "test"


def predictions_path(run, ablation: str) -> Path:
    """generate/<run>/predictions_test_{blank,shuffled}.jsonl, beside the real views' predictions_test.jsonl."""
    return run.generate_dir / f"predictions_{SPLIT}_{ablation}.jsonl"


def mean_grey(studies, max_views: int) -> int:
    """The studies' mean grey level (8 bits, over every pixel of their views): the blank views' colour."""
    total = pixels = 0
    for study in studies:
        for view in study_images(study, max_views):
            grey = np.asarray(view.convert("L"), dtype=np.float64)
            total, pixels = total + grey.sum(), pixels + grey.size
    return round(total / pixels)


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation without fixed points (Sattolo's algorithm draws one cycle through all n): study i takes
    the views of study `order[i]`, never its own."""
    rng, order = np.random.default_rng(seed), list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # j < i: a single cycle
        order[i], order[j] = order[j], order[i]
    return order


def ablation_views(studies, ablation: str, max_views: int, *, grey: int = 128, seed: int = 0):
    """study -> the views that replace its own, as many as its own so the prompt is the same: blank views of its
    views' sizes, or its donor's views (repeated when the donor has fewer)."""
    if ablation == "blank":
        return lambda study: [Image.new("RGB", view.size, (grey,) * 3) for view in study_images(study, max_views)]
    if ablation != "shuffled":
        raise ValueError(f"unknown ablation {ablation!r}: one of {ABLATIONS}")
    donors = {study.id: studies[j] for study, j in zip(studies, derangement(len(studies), seed))}

    def shuffled(study):
        theirs = study_images(donors[study.id], max_views)
        return [theirs[i % len(theirs)] for i in range(min(len(study.image_paths), max_views))]

    return shuffled


def generate_ablations(model, processor, studies, run, *, max_views: int, seed: int = 0, **options) -> dict:
    """Both ablations of `studies` (the first GROUNDING_STUDIES readable test studies) through `generate_split`:
    resumable files, same decoding as the real views. Returns speed figures by ablation."""
    if not studies:
        print("grounding check skipped: no test study chosen (GROUNDING_STUDIES = 0)")
        return {}
    grey = mean_grey(studies, max_views)
    chosen = ABLATIONS if len(studies) > 1 else ("blank",)
    print(f"grounding check on {len(studies)} test studies: blank views at their mean grey {grey}"
          + (f", shuffled views of another study (derangement, seed {seed})" if len(chosen) > 1 else
             "; shuffled skipped (it needs 2 studies)"))
    return {ablation: generate_split(model, processor, studies, predictions_path(run, ablation), max_views=max_views,
                                     views=ablation_views(studies, ablation, max_views, grey=grey, seed=seed),
                                     **options)
            for ablation in chosen}


def _text(prediction: dict, region: str) -> str:
    return whole_report(prediction["regions"]) if region == REPORT else prediction["regions"][region]


def evaluate(artifacts, runs: list[str], test_studies, judge, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per run, ablation and region (and whole report): studies, `unchanged` (share whose text equals the real views'
    report), `GREEN` of the ablated reports and `GREEN real` over the same studies (headline protocol), and the paired
    difference ablated - real with its 95% interval. Runs without ablation files are named and left out."""
    systems, reals, missing, unchanged = {}, {}, [], []
    by_id = {s.id: s for s in test_studies}
    for run in runs:
        real = reals[run] = load_predictions(artifacts.run(run).predictions(SPLIT), test_studies)
        for ablation in ABLATIONS:
            path = predictions_path(artifacts.run(run), ablation)
            if not path.is_file():
                missing.append(f"{run} {ablation}")
                continue
            ablated = {k: v for k, v in load_predictions(path, test_studies).items() if k in real}
            systems[(run, ablation)] = ablated
            unchanged += [{"system": run, "ablation": ablation, "region": COLUMNS[region], "studies": len(ablated),
                           "unchanged": np.mean([_text(p, region) == _text(real[k], region)
                                                 for k, p in ablated.items()])}
                          for region in SCORED]
    if missing:
        print(f"grounding: no ablated reports for {', '.join(missing)} (run notebook 03 with GROUNDING_STUDIES > 0)")
    rows = []
    for (run, ablation), ablated in systems.items():
        name = f"{run} [{ablation}]"
        frame = judge_systems({run: {SPLIT: reals[run]}, name: {SPLIT: ablated}}, {SPLIT: [by_id[k] for k in ablated]},
                              judge)
        means = region_stats(frame).set_index(["system", "region"]).green
        diff = paired_differences(frame, [name], run, n_boot, seed)
        for d in diff[diff.split == SPLIT_NAMES[SPLIT]].itertuples():
            region = next(r for r in SCORED if COLUMNS[r] == d.region)
            rows.append({"system": run, "ablation": ablation, "region": d.region, "GREEN": means[(name, region)],
                         "GREEN real": means[(run, region)], "difference": d.difference, "ci_lo": d.ci_lo,
                         "ci_hi": d.ci_hi})
    columns = ["system", "ablation", "region", "studies", "unchanged", "GREEN", "GREEN real", "difference", "ci_lo",
               "ci_hi"]
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(unchanged).merge(pd.DataFrame(rows), on=["system", "ablation", "region"])[columns]


def in_words(table: pd.DataFrame) -> str:
    """One sentence per run: whether it looks at the X-ray, from its whole reports."""
    if table.empty:
        return "No grounding check: no run has ablated reports (notebook 03, GROUNDING_STUDIES > 0)."
    lines = []
    for run, part in table[table.region == COLUMNS[REPORT]].groupby("system", sort=False):
        part = part.set_index("ablation")
        n = int(part.studies.max())
        if (part.unchanged == 1).all():
            lines.append(f"{run} does not look at the X-ray: it writes the same report for all {n} test studies with "
                         f"{' and with '.join(ABLATION_WORDS[a] for a in part.index)}.")
            continue
        changes = "; ".join(f"with {ABLATION_WORDS[a]} {1 - r.unchanged:.0%} of the reports change and whole-report "
                            f"GREEN moves {r.difference:+.3f} [{r.ci_lo:+.3f}, {r.ci_hi:+.3f}] from "
                            f"{r['GREEN real']:.3f}" for a, r in part.iterrows())
        uses = (part.ci_hi < 0).any()
        lines.append(f"{run} looks at the X-ray{' and scores higher with its own views' if uses else ''} ({n} test "
                     f"studies): {changes}" + ("." if uses else "; no interval lies below 0, so the image changes the "
                                                "words more than GREEN shows."))
    return "\n".join(lines)


def plot(table: pd.DataFrame, path):
    """Per run: GREEN with the real, blank and shuffled views (bars, per region and whole report) and the share of
    unchanged texts (marks)."""
    runs = list(dict.fromkeys(table.system))
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(6 * max(1, len(runs)), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        part = table[table.system == run]
        regions = list(dict.fromkeys(part.region))
        x = np.arange(len(regions))
        real = part.drop_duplicates("region").set_index("region")["GREEN real"].reindex(regions)
        ax.bar(x - 0.27, real, 0.27, label="real views", color="grey")
        for offset, (ablation, rows) in zip((0, 0.27), part.groupby("ablation", sort=False)):
            rows = rows.set_index("region").reindex(regions)
            ax.bar(x + offset, rows.GREEN, 0.27, label=f"{ablation} views")
            ax.plot(x + offset, rows.unchanged, "k_", markersize=14, markeredgewidth=2,
                    label="share of texts unchanged" if offset == 0 else None)
        ax.set_xticks(x, regions, fontsize=8)
        ax.set(ylim=(0, 1.05), ylabel="GREEN (bars), share unchanged (marks)",
               title=f"{run}: does it look? ({int(part.studies.max())} test studies)")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    if not runs:
        axes[0, 0].text(0.5, 0.5, "no ablated reports", ha="center", transform=axes[0, 0].transAxes, color="grey")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def write_outputs(table: pd.DataFrame, artifacts) -> list[Path]:
    """eval/compare/grounding.csv and plots/grounding.png."""
    csv, png = artifacts.compare_dir / "grounding.csv", artifacts.compare_dir / "plots" / "grounding.png"
    atomic_write_text(csv, table.to_csv(index=False))
    plot(table, png)
    return [csv, png]
