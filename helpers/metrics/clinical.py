"""Notebook 04: clinical efficacy and ReXrank's IU X-Ray metrics, computed by RadEval 2.2.1 on whole reports.

CheXbert F1 over the 14 observations and the 5 common ones (micro and macro, as RadEval's `f1chexbert` reports
them), SembScore (cosine of CheXbert embeddings, RadEval's `semantic_embedding_scores`), RadGraph F1 (RadEval's
`radgraph`: RadGraph-XL, partial level), BERTScore (`bertscore`: distilbert-base-uncased, layer 5, rescaled),
RaTEScore (`ratescore`) and 1/RadCliQ-v1 (`radcliq`); and, as ReXrank defines them, RadGraph combined (RadEval's
`radgraph_radcliq`: the original RadGraph model, mean of entity and relation F1) and BERTScore distilroberta
(RadEval's BertScore on distilroberta-base, layer 5, rescaled, no IDF). Per (system, split): the value, a percentile
95% bootstrap interval over studies, and each run against a reference run by a paired bootstrap (the same studies
resampled for both). Per-study metrics use `nlg.paired_bootstrap`; CheXbert F1 and 1/RadCliQ-v1 are corpus
statistics (F1 of pooled label counts, inverse of a mean), recomputed on each resample from RadEval's per-study
labels and scores.

Whole reports only: the four regions joined as `report_format.whole_report` joins them. RadEval has no region-aware metric
(its models label or parse whatever text they get, and were trained on whole reports); GREEN covers the regions.
Studies whose whole reference is empty are not scored (counted in neither `Studies` nor the intervals).
Checkpoints come from the hub at run time (`StanfordAIMI/RRG_scorers` and the encoders' own repositories); the demo
and the tests use random stand-ins (`radeval_stand_ins.build_radeval_stand_ins`) loaded through RadEval's own code
(`radeval_compat`: how RadEval is run here, its bugs worked around).
Memory: one metric's models at a time, freed after it (never beside the GREEN judge: free it first).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd

from .nlg import paired_bootstrap
from ..core.report_format import REPORT, whole_report
from .radeval_compat import SCORERS, import_radeval, model_cache, release, unavailable
from ..core.runs import SPLIT_NAMES
from ..core.storage import atomic_write_text

CHEXBERT = {"CheXbert F1 micro-14": ("all", "micro"), "CheXbert F1 macro-14": ("all", "macro"),
            "CheXbert F1 micro-5": ("5", "micro"), "CheXbert F1 macro-5": ("5", "macro")}
RADCLIQ = "1/RadCliQ-v1"
PER_STUDY = ("SembScore", "RadGraph F1", "RadGraph combined", "BERTScore", "BERTScore distilroberta",
             "RaTEScore")  # means of per-study scores
COLUMNS = [*CHEXBERT, *PER_STUDY, RADCLIQ]
# The columns each RadEval metric group run here (radeval_compat.SCORERS) fills.
GROUPS = {"f1chexbert": list(CHEXBERT), "semb": ["SembScore"], "radgraph": ["RadGraph F1"],
          "radgraph_radcliq": ["RadGraph combined"], "bertscore": ["BERTScore"],
          "bertscore_rexrank": ["BERTScore distilroberta"], "ratescore": ["RaTEScore"], "radcliq": [RADCLIQ]}
REXRANK_COLUMNS = ["BLEU", "BERTScore", "SembScore", "RadGraph", RADCLIQ, "RaTEScore", "GREEN"]
REXRANK_NOTE = (
    "Comparable with ReXrank's IU X-Ray board only in part. Same definitions, other code: BERTScore (distilroberta-"
    "base, rescaled, no IDF), SembScore, RadGraph (mean of entity and relation F1, original RadGraph model) and "
    "RaTEScore from RadEval 2.2.1, not ReXrank's CXR-Report-Metric pipeline; GREEN with GREEN-RadLlama2-7b "
    "(helpers.evaluate.green; 4-bit on GPUs under 20 GiB, which scores differently). Different: BLEU is pycocoevalcap's "
    "corpus BLEU-2 on R2Gen-cleaned text (helpers.metrics.nlg; ReXrank averages per-report BLEU-2); 1/RadCliQ-v1 is "
    "RadEval's (its BERTScore term weighs tokens by IDF over the split's references); the test studies are "
    "annotation.json's (R2Gen's split, 590 studies), not necessarily ReXrank's; the findings are the four region "
    "sections joined (lung, heart, mediastinal, bone; 'others' dropped), not the original findings text.")


def study_pairs(systems: dict[str, dict[str, dict]], references: dict[str, list]) -> pd.DataFrame:
    """One row per (system, split, study) with a prediction and a non-empty whole reference: its two whole reports."""
    rows = []
    for system, by_split in systems.items():
        for split, predictions in by_split.items():
            for study in references[split]:
                reference = whole_report(study.regions)
                if study.id in predictions and reference:
                    rows.append({"system": system, "split": split, "id": study.id, "reference": reference,
                                 "candidate": whole_report(predictions[study.id]["regions"])})
    return pd.DataFrame(rows, columns=["system", "split", "id", "reference", "candidate"])


def score_studies(systems, references, *, groups=None, stand_ins: str | Path | None = None) -> pd.DataFrame:
    """`study_pairs` with each metric's per-study result: PER_STUDY's columns, RadCliQ-v1 (lower is better) and both
    reports' 14 CheXbert labels (`chexbert_reference`, `chexbert_candidate`).

    `groups`: the GROUPS to run (default all); one that cannot run here is skipped, its reason printed, its columns
    NaN. `stand_ins`: a `radeval_stand_ins.build_radeval_stand_ins` folder to load every checkpoint from (offline).
    """
    pairs = study_pairs(systems, references)
    missing = unavailable()
    for group in groups or GROUPS:
        if group in missing:
            print(f"{', '.join(GROUPS[group])}: n/a ({missing[group]})")
            continue
        with model_cache(stand_ins) if stand_ins else nullcontext():
            for column, values in SCORERS[group][1](pairs).items():
                pairs[column] = list(values) if column.startswith("chexbert") else np.asarray(values, dtype=float)
        release()  # the next metric loads alone
    return pairs


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """n_boot x n: how often each study is drawn in each resample, drawn as `nlg.paired_bootstrap` draws them."""
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    weights = np.zeros((n_boot, n))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1)
    return weights


def _top5_index() -> list[int]:
    """Where RadEval's 5 common observations sit among its 14 labels (its CheXbert conditions, then No Finding)."""
    chexbert = import_radeval("radeval.metrics.f1chexbert.f1chexbert").F1CheXbert
    return [[*chexbert.CONDITION_NAMES, chexbert.NO_FINDING].index(name) for name in chexbert.TOP5]


def _f1(reference, candidate, weights, average: str) -> np.ndarray:
    # sklearn's f1_score takes one resample per call (four per resample, system and split): the same F1, vectorized
    tp, fp, fn = (weights @ (a & b) for a, b in ((reference, candidate), (~reference, candidate),
                                                 (reference, ~candidate)))
    if average == "micro":
        tp, fp, fn = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)  # 0 when undefined, as sklearn's report
    return f1 if average == "micro" else f1.mean(axis=1)


def statistic(part: pd.DataFrame, column: str, weights: np.ndarray) -> np.ndarray:
    """`column` of the studies in `part` under each row of study weights (all ones: the value itself)."""
    if column in CHEXBERT:
        if "chexbert_reference" not in part:
            return np.full(len(weights), np.nan)
        labels, average = CHEXBERT[column]
        keep = slice(None) if labels == "all" else _top5_index()
        reference, candidate = (np.array(part[f"chexbert_{side}"].tolist(), dtype=bool).reshape(len(part), 14)[:, keep]
                                for side in ("reference", "candidate"))
        return _f1(reference, candidate, weights, average)
    values = part.get("RadCliQ-v1" if column == RADCLIQ else column, pd.Series(np.nan, index=part.index)).to_numpy()
    mean = weights @ values / weights.sum(axis=1)
    return 1 / mean if column == RADCLIQ else mean


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[~np.isnan(samples)]
    return tuple(np.percentile(samples, [2.5, 97.5])) if len(samples) else (np.nan, np.nan)


def clinical_table(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0, stand_ins: bool = False) -> pd.DataFrame:
    """Rows (system, split as SPLIT_NAMES names it); columns Studies, COLUMNS, then `<column> lo/hi` (percentile 95%
    bootstrap over studies) and Checkpoints (whether the numbers come from the real models or meaningless stand-ins)."""
    rows = {}
    for (system, split), part in scores.groupby(["system", "split"], sort=False):
        weights = resample_weights(len(part), n_boot, seed)
        row = {"Studies": len(part), **{c: float(statistic(part, c, np.ones((1, len(part))))[0]) for c in COLUMNS}}
        for column in COLUMNS:
            row[f"{column} lo"], row[f"{column} hi"] = _interval(statistic(part, column, weights))
        rows[(system, SPLIT_NAMES[split])] = {**row, "Checkpoints": "random stand-ins: meaningless" if stand_ins
                                              else "hub"}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["system", "split"])


def paired_differences(scores: pd.DataFrame, runs: list[str], reference: str, n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """Each run minus `reference`, per split and metric, over the studies both score, as green.paired_differences
    lays them out. Per-study metrics: `nlg.paired_bootstrap` (with win, tie and loss shares); corpus metrics: both
    recomputed on the same resampled studies (win, tie and loss shares are not defined for them: NaN)."""
    rows = []
    for run in runs:
        if run == reference:
            continue
        for split in SPLIT_NAMES:
            base = scores[(scores.system == reference) & (scores.split == split)].set_index("id")
            other = scores[(scores.system == run) & (scores.split == split)].set_index("id")
            common = base.index.intersection(other.index)
            # corpus metrics: row 0 weighs each common study once (the difference itself), then the resamples
            weights = (np.vstack([np.ones((1, len(common))), resample_weights(len(common), n_boot, seed)])
                       if len(common) else None)
            for column in COLUMNS:
                row = {"run": run, "reference": reference, "split": SPLIT_NAMES[split], "metric": column}
                if column in PER_STUDY:
                    a, b = (side.get(column, pd.Series(np.nan, index=side.index)) for side in (base, other))
                    result = paired_bootstrap(a.to_numpy(), b.reindex(a.index).to_numpy(), n_boot, seed)
                    low, high = result["ci95"]
                    row.update(studies=result["studies"], difference=result["b_minus_a"], ci_lo=low, ci_hi=high,
                               wins=result["a_loses"], ties=result["ties"], losses=result["a_wins"])
                else:
                    a, b = base.loc[common], other.loc[common]
                    delta = (statistic(b, column, weights) - statistic(a, column, weights) if len(common)
                             else np.full(2, np.nan))
                    low, high = _interval(delta[1:])
                    row.update(studies=len(common), difference=float(delta[0]), ci_lo=low, ci_hi=high, wins=np.nan,
                               ties=np.nan, losses=np.nan)
                row["excludes_0"] = bool(row["ci_lo"] > 0 or row["ci_hi"] < 0)
                rows.append(row)
    return pd.DataFrame(rows, columns=["run", "reference", "split", "metric", "studies", "difference", "ci_lo",
                                       "ci_hi", "excludes_0", "wins", "ties", "losses"])


def evaluate(systems: dict[str, dict[str, dict]], references: dict[str, list], *, reference_run: str,
             run_names: list[str], n_boot: int = 1000, seed: int = 0, groups=None,
             stand_ins: str | Path | None = None):
    """Every run and baseline of `systems` ({system: {split: predictions by study id}}) against `references`
    ({split: studies}), whole reports, val and test: returns (table, diff, scores).

    table: `clinical_table` (every system); diff: `paired_differences` of `run_names` against `reference_run`;
    scores: `score_studies` (one row per system, split and study). `stand_ins`: the demo's random checkpoints.
    """
    if stand_ins:
        print("RadEval on random stand-in checkpoints (demo): every clinical number below is meaningless")
    scores = score_studies(systems, references, groups=groups, stand_ins=stand_ins)
    return (clinical_table(scores, n_boot, seed, stand_ins=bool(stand_ins)),
            paired_differences(scores, run_names, reference_run, n_boot, seed), scores)


def leaderboard(table: pd.DataFrame, nlg: pd.DataFrame, green_compare: pd.DataFrame) -> pd.DataFrame:
    """ReXrank's IU X-Ray columns for every system on the test split, whole reports (REXRANK_NOTE: what compares).

    `table`: `clinical_table` (BERTScore = its BERTScore distilroberta, RadGraph = its RadGraph combined, as ReXrank
    defines them); `nlg`: `nlg.nlg_table` (BLEU = its BLEU-2); `green_compare`: `green.compare_table` (GREEN = its
    Whole report column).
    """
    test = SPLIT_NAMES["test"]
    clinical = table.xs(test, level="split")
    bleu = nlg[(nlg.split == "test") & (nlg.region == REPORT)].set_index("system")["BLEU-2"]
    green = green_compare.xs(test, level="split")["Whole report"]
    row = pd.DataFrame({"BLEU": bleu, "BERTScore": clinical["BERTScore distilroberta"],
                        "SembScore": clinical["SembScore"], "RadGraph": clinical["RadGraph combined"],
                        RADCLIQ: clinical[RADCLIQ],
                        "RaTEScore": clinical["RaTEScore"], "GREEN": green})
    return row.reindex(index=clinical.index, columns=REXRANK_COLUMNS).rename_axis("system")


def write_outputs(table, diff, scores, artifacts, board: pd.DataFrame | None = None) -> list[Path]:
    """eval/compare/: clinical.csv (`table`), clinical_diff.csv, clinical_studies.csv (per-study scores and CheXbert
    labels) and, when given, rexrank_iu_xray.csv (`leaderboard`, REXRANK_NOTE in its first line), written atomically."""
    files = {artifacts.compare_dir / "clinical.csv": table.to_csv(),
             artifacts.compare_dir / "clinical_diff.csv": diff.to_csv(index=False),
             artifacts.compare_dir / "clinical_studies.csv": scores.to_csv(index=False)}
    if board is not None:
        files[artifacts.compare_dir / "rexrank_iu_xray.csv"] = f"# {REXRANK_NOTE}\n" + board.to_csv()
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)
