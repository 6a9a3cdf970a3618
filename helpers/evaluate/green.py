"""Notebook 04: GREEN per anatomical region: the (reference, candidate) pairs, the protocol's statistics, bootstrap
intervals and the tables. The judge that scores the pairs is helpers/judge/judge.py."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.data import REGIONS, DataError
from ..judge.judge import Judge, score_response
from ..metrics.nlg import paired_bootstrap
from ..core.report_format import HEADERS, REPORT, whole_report
from ..core.runs import SPLIT_NAMES
from ..core.storage import atomic_write_text

SCORED = (*REGIONS, REPORT)
COLUMNS = {**HEADERS, REPORT: "Whole report"}  # one pair per study, as whole-findings leaderboards score
TABLE_COLUMNS = [*HEADERS.values(), "Mean", COLUMNS[REPORT]]
PROTOCOL = ("Headline: per region, the mean GREEN over the studies whose reference for that region is non-empty. "
            "Raw mean: over all studies (GREEN's compute_green returns 0 whenever the judge counts 0 matched "
            "findings, so a both-empty pair scores 0 when its answer parses). Unparseable judge answers are failures: "
            "counted, never averaged. 'others' is never scored. Mean column: mean of the four region means. "
            "Whole report: the four regions joined in a fixed order, against the references joined the same way.")


def region_pairs(system: str, split: str, references: list, predictions: dict[str, dict]) -> list[dict]:
    """One row per (study, region or whole report): reference and candidate text; studies without a prediction are
    named once."""
    rows, missing = [], []
    for study in references:
        if study.regions is None:
            raise DataError(f"{split} study {study.id} has no region report: use notebook 01's annotation_with_val.json")
        prediction = predictions.get(study.id)
        if prediction is None:
            missing.append(study.id)
            continue
        confidence = prediction.get("confidence") or {}
        for region in SCORED:
            reference, candidate = ((whole_report(study.regions), whole_report(prediction["regions"]))
                                    if region == REPORT else (study.regions[region], prediction["regions"][region]))
            rows.append({"system": system, "split": split, "id": study.id, "region": region, "reference": reference,
                         "candidate": candidate, "confidence": confidence.get(region)})
    if missing:
        print(f"WARNING {system}/{split}: {len(missing)} of {len(references)} studies have no prediction and are "
              f"not scored: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}")
    return rows


def evaluate(systems: dict[str, dict[str, dict]], references: dict[str, list], judge: Judge):
    """Judge every (reference, candidate) pair of every system and split at once (dedupe across systems too).

    `systems`: {system: {split: predictions by study id}}; `references`: {split: studies}.
    """
    rows = [row for system, by_split in systems.items() for split, predictions in by_split.items()
            for row in region_pairs(system, split, references[split], predictions)]
    records = judge.judge([(row["reference"], row["candidate"]) for row in rows])
    return judged_frame(rows, records)


def judged_frame(rows: list[dict], records: list[dict]):
    """Rows joined with their judge records and GREEN's parse of each answer: one line per (system, split, study, region)."""
    out = []
    for row, record in zip(rows, records):
        score = score_response(record["response"])
        out.append({**row, "key": record["key"], "judge": record["judge"], "response": record["response"], "truncated": record["truncated"],
                    "green": float("nan") if score["green"] is None else float(score["green"]), "parsed": score["parsed"], "matched": score["matched"],
                    **{f"error_{c}": n for c, n in score["errors"].items()},
                    "ref_empty": not row["reference"], "both_empty": not row["reference"] and not row["candidate"],
                    "ref_empty_pred": not row["reference"] and bool(row["candidate"])})
    return pd.DataFrame(out)


def region_stats(frame):
    """Per system, split and region: the headline and raw means, and every count the protocol reports."""
    stats = []
    for (system, split, region), g in frame.groupby(["system", "split", "region"], sort=False):
        headline = g[~g.ref_empty]
        stats.append({"system": system, "split": split, "region": region, "studies": len(g),
                      "ref_nonempty": len(headline), "scored": int(headline.parsed.sum()),
                      "green": headline.green.mean(), "raw_green": g.green.mean(), "raw_scored": int(g.parsed.sum()),
                      "both_empty": int(g.both_empty.sum()), "ref_empty_pred": int(g.ref_empty_pred.sum()),
                      "unparseable": int((~g.parsed).sum()), "unparseable_headline": int((~headline.parsed).sum()),
                      "truncated": int(g.truncated.sum())})
    return pd.DataFrame(stats)


def _headline_matrix(frame):
    """Studies x regions of headline scores; NaN where the reference is empty or the answer did not parse."""
    scores = frame.green.where(~frame.ref_empty & frame.parsed).astype(float)
    return frame.assign(score=scores).pivot(index="id", columns="region", values="score").reindex(columns=list(SCORED))


def _region_means(matrix):

    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(matrix, axis=-2) / (~np.isnan(matrix)).sum(axis=-2)


def bootstrap_ci(frame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Percentile 95% intervals of the headline means, resampling studies (regions and whole report together)."""
    matrix = _headline_matrix(frame).to_numpy()
    rng = np.random.default_rng(seed)
    samples = _region_means(matrix[rng.integers(0, len(matrix), size=(n_boot, len(matrix)))])  # n_boot x 5
    columns = [COLUMNS[r] for r in REGIONS] + ["Mean", COLUMNS[REPORT]]
    samples = np.column_stack([samples[:, :len(REGIONS)], samples[:, :len(REGIONS)].mean(axis=1), samples[:, -1]])
    out = {}
    for i, column in enumerate(columns):
        values = samples[:, i][~np.isnan(samples[:, i])]
        out[column] = tuple(np.percentile(values, [2.5, 97.5])) if len(values) else (np.nan, np.nan)
    return out


def green_tables(frame, stats, system: str, n_boot: int = 1000, seed: int = 0):
    """(table, ci) of one system: index Validation/Testing; columns Lung, Heart, Mediastinal, Bone, Mean, Whole report.

    Mean is the mean of the four region means (n/a if a region has none); ci has columns `<column> lo/hi`.
    """
    mine = stats[stats.system == system]
    table = mine.pivot(index="split", columns="region", values="green").reindex(
        index=[s for s in SPLIT_NAMES if s in set(mine.split)], columns=list(SCORED))
    table.insert(len(REGIONS), "Mean", table[list(REGIONS)].mean(axis=1, skipna=False))
    table = table.rename(index=SPLIT_NAMES, columns=COLUMNS).rename_axis(index=None, columns=None)
    ci = {SPLIT_NAMES[split]: {f"{c} {end}": v for c, bounds in bootstrap_ci(
              frame[(frame.system == system) & (frame.split == split)], n_boot, seed).items()
              for end, v in zip(("lo", "hi"), bounds)}
          for split in SPLIT_NAMES if split in set(mine.split)}
    return table, pd.DataFrame.from_dict(ci, orient="index")


def tables_by_system(frame, stats, n_boot: int = 1000, seed: int = 0) -> dict:
    """`green_tables` of every system judged in `frame`, in the order they were given."""
    return {system: green_tables(frame, stats, system, n_boot, seed) for system in frame.system.unique()}


def markdown_table(table, ci=None, digits: int = 3) -> str:
    """A README-ready markdown table (pandas' to_markdown needs tabulate, not worth a dependency)."""
    def cell(row, column):
        value = table.loc[row, column]
        if math.isnan(value):
            return "n/a"
        if ci is None:
            return f"{value:.{digits}f}"
        return f"{value:.{digits}f} [{ci.loc[row, f'{column} lo']:.{digits}f}, {ci.loc[row, f'{column} hi']:.{digits}f}]"

    lines = ["| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(row, c) for c in table.columns) + " |" for row in table.index]
    return "\n".join(lines)


def compare_table(tables: dict):
    """Every system's table and intervals in one frame: rows (system, split), columns TABLE_COLUMNS then lo/hi."""
    return pd.concat({system: table.join(ci) for system, (table, ci) in tables.items()}, names=["system", "split"])


def paired_differences(frame, runs: list[str], reference: str, n_boot: int = 1000, seed: int = 0):
    """Each run against `reference`, per split and region (and whole report): the mean headline difference over the
    studies both score, its paired-bootstrap 95% interval, and the shares of studies the run wins, ties, loses."""
    rows = []
    for run in runs:
        if run == reference:
            continue
        for split in SPLIT_NAMES:
            base = _headline_matrix(frame[(frame.system == reference) & (frame.split == split)])
            other = _headline_matrix(frame[(frame.system == run) & (frame.split == split)]).reindex(base.index)
            for region in SCORED:
                result = paired_bootstrap(base[region].to_numpy(), other[region].to_numpy(), n_boot, seed)
                low, high = result["ci95"]
                rows.append({"run": run, "reference": reference, "split": SPLIT_NAMES[split],
                             "region": COLUMNS[region], "studies": result["studies"],
                             "difference": result["b_minus_a"], "ci_lo": low, "ci_hi": high,
                             "excludes_0": bool(low > 0 or high < 0), "wins": result["a_loses"],
                             "ties": result["ties"], "losses": result["a_wins"]})
    return pd.DataFrame(rows, columns=["run", "reference", "split", "region", "studies", "difference", "ci_lo",
                                       "ci_hi", "excludes_0", "wins", "ties", "losses"])


def differences_in_words(diff) -> str:
    """The paired differences whose 95% interval excludes 0, one line each (or a line saying there are none)."""
    real = diff[diff.excludes_0]
    if real.empty:
        return f"No difference excludes 0 ({len(diff)} run x split x region comparisons)."
    return "\n".join(f"{r.run} vs {r.reference}, {r.split}, {r.region}: {r.difference:+.3f} "
                     f"[{r.ci_lo:+.3f}, {r.ci_hi:+.3f}] over {r.studies} studies (wins {r.wins:.0%}, ties "
                     f"{r.ties:.0%}, losses {r.losses:.0%})" for r in real.itertuples())


def write_outputs(frame, stats, tables: dict, diff, nlg, artifacts, runs: list[str]) -> list[Path]:
    """Everything notebook 04 reports, written atomically (a rerun rewrites the same files from the judge cache).

    Per run, in eval/<run>/: green_table.csv, green_table_ci.csv, green_{val,test}.jsonl (its per-pair judgments).
    In eval/compare/: green_compare.csv (every system), green_diff.csv, nlg.csv, green_stats.csv and
    baseline_green_{val,test}.jsonl.
    """
    judges = ", ".join(frame.judge.unique())  # the judge's id and precision beside every table
    files = {artifacts.compare_dir / "green_compare.csv": compare_table(tables).assign(judge=judges).to_csv(),
             artifacts.compare_dir / "green_diff.csv": diff.to_csv(index=False),
             artifacts.compare_dir / "nlg.csv": nlg.to_csv(index=False),
             artifacts.compare_dir / "green_stats.csv": stats.to_csv(index=False)}
    for split in SPLIT_NAMES:
        part = frame[frame.split == split]
        files[artifacts.compare_dir / f"baseline_green_{split}.jsonl"] = part[~part.system.isin(runs)].to_json(
            orient="records", lines=True, force_ascii=False)
        for run in runs:
            files[artifacts.run(run).eval_dir / f"green_{split}.jsonl"] = part[part.system == run].to_json(
                orient="records", lines=True, force_ascii=False)
    for run in runs:
        files[artifacts.run(run).eval_dir / "green_table.csv"] = tables[run][0].assign(judge=judges).to_csv()
        files[artifacts.run(run).eval_dir / "green_table_ci.csv"] = tables[run][1].assign(judge=judges).to_csv()
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)


def confidence_vs_errors(frame, system: str):
    """Per region: mean token probability of pairs with and without a false finding (a), and their counts."""
    scored = frame[(frame.system == system) & frame.parsed & frame.confidence.notna()]
    rows = []
    for region in REGIONS:
        part = scored[scored.region == region]
        false = part.error_a > 0
        rows.append({"region": HEADERS[region], "pairs": len(part), "with_false_finding": int(false.sum()),
                     "confidence_with": part.confidence[false].mean(), "confidence_without": part.confidence[~false].mean()})
    return pd.DataFrame(rows).set_index("region")
