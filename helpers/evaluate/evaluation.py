"""Notebook 04's steps, shared with `python -m helpers evaluate`: which runs, judge and retrieval model; the
systems to judge (runs and baselines); the tables in words; every figure written."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import matplotlib.pyplot as plt
import pandas as pd

from ..metrics import clinical
from ..demo import radeval_stand_ins, tiny_models
from . import baselines, plots
from ..core.data import DataError, by_split, load_studies
from ..model.generation import load_predictions
from .green import COLUMNS as GREEN_COLUMNS, PROTOCOL, SCORED, compare_table, markdown_table, paired_differences
from ..judge.judge import DEFAULT_ENGINE, Judge
from ..model.modeling import load_model_and_processor
from ..core.report_format import REPORT, whole_report
from ..core.runs import SPLIT_NAMES
from ..core.settings import get_secret, processes, torch_dtype
from ..core.storage import atomic_write_text, free_gpu_memory


@dataclass(frozen=True)
class Plan:
    """Notebook 04's parameters with every None resolved."""
    runs: list[str]
    reference_run: str
    judge_model_id: str
    judge_precision: str  # GREEN's fp16 on every GPU (settings.judge_precision)
    judge_4bit: bool
    judge_batch_size: int
    judge_max_new_tokens: int
    judge_engine: str  # "static" | "continuous" | "server" (judge.ENGINES)
    judge_url: str | None  # the server's, for "server"; None: started here (vLLM on a GPU)
    base_model_id: str  # retrieval embeddings
    retrieval_4bit: bool
    retrieval: bool  # False: the template baseline alone (FREE_T4, the free-T4 plan)
    max_views: int

    def __str__(self) -> str:
        return "\n".join(f"{k:>21}: {v}" for k, v in asdict(self).items())


def make_plan(settings, artifacts, studies, *, run_names=None, reference_run=None, judge_model_id=None, judge_4bit=None,
         judge_batch_size=None, judge_max_new_tokens=None, judge_engine=None, judge_url=None, base_model_id=None,
         max_views=None, retrieval: bool = True) -> Plan:
    """Runs to compare (None: every run with predictions), the judge and the retrieval model (None: the first run's
    base model; in the demo the tiny stand-ins), from the settings where not given."""
    compared = artifacts.find_runs(run_names)
    first = compared[0].config if compared[0].config_path.is_file() else {}
    base_model_id = tiny_models.llava_id(settings, artifacts, studies, base_model_id or first.get("model_id"))
    return Plan(runs=[r.name for r in compared], reference_run=reference_run or compared[0].name,
                judge_model_id=tiny_models.judge_id(settings, artifacts, studies, judge_model_id),
                judge_precision=settings.judge_precision,
                judge_4bit=settings.judge_4bit if judge_4bit is None else judge_4bit,
                judge_batch_size=judge_batch_size or settings.judge_batch_size,
                judge_max_new_tokens=judge_max_new_tokens or settings.judge_max_new_tokens,
                judge_engine=judge_engine or DEFAULT_ENGINE, judge_url=judge_url,
                base_model_id=base_model_id,  # 4-bit by its size on this GPU
                retrieval_4bit=settings.for_model_id(base_model_id).inference_4bit,
                retrieval=retrieval, max_views=max_views or first.get("max_views", 3))


def references(settings, artifacts, studies) -> dict[str, list]:
    """The scored studies by split: val with notebook 01's region split, test as annotated."""
    if not artifacts.split_annotation.is_file():
        raise DataError(f"{artifacts.split_annotation} not found: the val references are notebook 01's split of the "
                        f"val reports; run notebook 01 (or python -m helpers split) first")
    with_val = load_studies(settings.data_dir, annotation_path=artifacts.split_annotation)
    return {"val": by_split(with_val, "val"), "test": by_split(studies, "test")}


def run_predictions(artifacts, run_names: list[str], refs: dict[str, list]) -> dict[str, dict[str, dict]]:
    """{run: {split: predictions by study id}}, each checked against the split's studies (counts printed)."""
    predictions = {name: {split: load_predictions(artifacts.run(name).predictions(split), refs[split])
                          for split in SPLIT_NAMES} for name in run_names}
    for name, per_split in predictions.items():
        print(name, {split: f"{len(p)} predictions for {len(refs[split])} reference studies"
                     for split, p in per_split.items()})
    return predictions


def with_baselines(predictions: dict, train, refs: dict[str, list], artifacts, plan: Plan) -> dict:
    """The runs' predictions plus the template and retrieval baselines (the template alone without `plan.retrieval`),
    as `green.evaluate` takes them.

    With several processes the main one embeds the images (cached), the others read its cache.
    """
    template = {split: baselines.template_predictions(train, studies) for split, studies in refs.items()}
    if not plan.retrieval:
        return {**predictions, "template": template}
    with processes().main_process_first():
        neighbors = baselines.retrieval_neighbors(
            artifacts.retrieval_neighbors, plan.base_model_id, train, refs["val"] + refs["test"],
            plan.max_views,
            lambda: load_model_and_processor(plan.base_model_id, visual_tokens="base",
                                             load_in_4bit=plan.retrieval_4bit, token=get_secret("HF_TOKEN")))
    free_gpu_memory()  # the base model is no longer referenced: free its memory before the judge loads
    return {**predictions, "template": template,
            "retrieval": {split: baselines.retrieval_predictions(
                train, {s.id: neighbors[s.id] for s in studies if s.id in neighbors}) for split, studies in refs.items()}}


def clinical_metrics(settings, artifacts, studies, systems: dict, references: dict, plan: Plan, judge: Judge, nlg,
                     tables: dict, n_boot: int, seed: int) -> tuple:
    """RadEval's clinical metrics of every system (`clinical.evaluate`), after the GREEN judge is released (on a T4
    they never share the GPU with it); their tables, the ReXrank row and the plot written. Returns
    (table, paired differences, ReXrank row, per-study scores, paths written)."""
    judge.release()
    table, diff, scores = clinical.evaluate(systems, references, reference_run=plan.reference_run, run_names=plan.runs,
                                            n_boot=n_boot, seed=seed,
                                            stand_ins=radeval_stand_ins.radeval_cache(settings, artifacts, studies))
    board = clinical.leaderboard(table, nlg, compare_table(tables))
    paths = clinical.write_outputs(table, diff, scores, artifacts, board)
    paths.append(artifacts.compare_dir / "plots" / "clinical.png")
    plots.plot_clinical(table, plan.runs, paths[-1])
    return table, diff, board, scores, paths


def make_judge(artifacts, plan: Plan) -> Judge:
    return Judge(plan.judge_model_id, artifacts.judge_cache, load_in_4bit=plan.judge_4bit,
                 dtype=torch_dtype(plan.judge_precision), token=get_secret("HF_TOKEN"), batch_size=plan.judge_batch_size,
                 max_new_tokens=plan.judge_max_new_tokens, engine=plan.judge_engine, url=plan.judge_url)


def judge_speed(judge: Judge) -> str:
    seconds = [r["seconds"] for r in judge.store.records.values()
               if r.get("judge") == judge.label and "seconds" in r]
    if not seconds:
        return f"judge time: every pair came from the cache ({judge.store.path})"
    return (f"judge time: {sum(seconds) / len(seconds):.2f} s per pair over the {len(seconds)} pairs it judged "
            f"(all runs)")


def tables_in_words(tables: dict, stats, plan: Plan, judge: Judge) -> str:
    """The protocol, then each system's GREEN table (markdown, 95% intervals) with its counts and the judge's
    precision beside its id."""
    parts = [PROTOCOL]
    for system, (table, ci) in tables.items():
        kind = "run" if system in plan.runs else "baseline"
        scored = stats[stats.system == system]
        parts.append(f"### {system} ({kind}), judge {judge.label}: {scored.studies.max()} studies per "
                     f"split, {scored.scored.sum()} pairs scored, {scored.unparseable.sum()} unparseable answers\n\n"
                     + markdown_table(table, ci))
    return "\n\n".join(parts)


def write_figures(frame, tables: dict, artifacts, run_names: list[str]) -> list:
    """Every figure of notebook 04, saved where the notebook saves it."""
    paths = [artifacts.compare_dir / "plots" / "green_per_region.png"]
    plots.plot_region_scores(tables, run_names, paths[0])
    for name in run_names:
        out = artifacts.run(name).eval_dir / "plots"
        plots.plot_error_categories(frame, out / "error_categories.png", name)
        plots.plot_score_distribution(frame, out / "score_distribution.png", name)
        plots.plot_confidence_vs_green(frame, out / "confidence_vs_errors.png", name)
        paths += [out / "error_categories.png", out / "score_distribution.png", out / "confidence_vs_errors.png"]
    plt.close("all")
    return paths


def report_lengths(systems: dict[str, dict[str, dict]]):
    """Per system and split: mean words of the whole report and distinct reports (whitespace-normalised), the two
    numbers a win made of longer or templated reports shows in."""
    rows = []
    for system, splits in systems.items():
        for split, predictions in splits.items():
            reports = [" ".join(whole_report(p["regions"]).split()) for p in predictions.values()]
            rows.append({"system": system, "split": SPLIT_NAMES[split], "studies": len(reports),
                         "mean words": sum(len(r.split()) for r in reports) / len(reports) if reports else float("nan"),
                         "distinct reports": len(set(reports))})
    return pd.DataFrame(rows).set_index(["system", "split"])


def sft_counterparts(artifacts, run_names: list[str]) -> dict[str, str | None]:
    """Each compared run with a preference stage -> the compared run trained with the same settings and its SFT stages
    only (two_stage for two_stage_dpo), or None when there is none among them."""
    configs = {name: artifacts.run(name).config for name in run_names if artifacts.run(name).config_path.is_file()}

    def sft_part(config):
        return ({k: v for k, v in config.items() if k not in ("preset", "stages", "preference", "full_run")},
                [stage for stage in config["stages"] if not stage.get("dpo")])

    return {name: next((other for other, c in configs.items() if "preference" not in c and sft_part(c) == sft_part(config)),
                       None)
            for name, config in configs.items() if "preference" in config}


def preference_comparison(counterparts: dict, frame, stats, nlg, lengths, clinical_table=None, clinical_scores=None,
                          n_boot: int = 1000, seed: int = 0):
    """Each preference run against its SFT counterpart, per split: what it optimises (GREEN per region and whole
    report: paired bootstrap) and what it does not (NLG on whole reports; RadEval's metrics, paired bootstrap; mean
    report length; distinct reports). Columns: sft, dpo, difference (dpo - sft), its 95% interval where paired."""
    rows, means = [], stats.set_index(["system", "split", "region"]).green
    for run, sft in counterparts.items():
        if sft is None:
            continue
        green_diff = paired_differences(frame, [run], sft, n_boot, seed).set_index(["split", "region"])
        clinical_diff = (clinical.paired_differences(clinical_scores, [run], sft, n_boot, seed)
                         .set_index(["split", "metric"]) if clinical_scores is not None else None)
        for split, name in SPLIT_NAMES.items():
            def row(measure, optimised, a, b, ci=(float("nan"), float("nan"))):
                a, b = (float("nan") if v is None else float(v) for v in (a, b))  # None: METEOR switched off
                rows.append({"run": run, "sft counterpart": sft, "split": name, "measure": measure,
                             "optimised by DPO": optimised, "sft": a, "dpo": b, "difference": b - a,
                             "ci_lo": ci[0], "ci_hi": ci[1]})

            for region in SCORED:
                d = green_diff.loc[(name, GREEN_COLUMNS[region])]
                row(f"GREEN {GREEN_COLUMNS[region]}", True, means[(sft, split, region)], means[(run, split, region)],
                    (d.ci_lo, d.ci_hi))
            whole = nlg[(nlg.split == split) & (nlg.region == REPORT)].set_index("system")
            for metric in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
                row(f"{metric} (whole report)", False, whole.at[sft, metric], whole.at[run, metric])
            if clinical_diff is not None:
                for metric in clinical.COLUMNS:
                    d = clinical_diff.loc[(name, metric)]
                    row(metric, False, clinical_table.at[(sft, name), metric], clinical_table.at[(run, name), metric],
                        (d.ci_lo, d.ci_hi))
            for measure in ("mean words", "distinct reports"):
                row(measure, False, lengths.at[(sft, name), measure], lengths.at[(run, name), measure])
    return pd.DataFrame(rows, columns=["run", "sft counterpart", "split", "measure", "optimised by DPO", "sft", "dpo",
                                       "difference", "ci_lo", "ci_hi"])


def preference_in_words(comparison, counterparts: dict) -> str:
    """One paragraph per preference run: its GREEN gain and what moved with it, or why it has no comparison."""
    parts = [f"{run}: no SFT counterpart among the compared runs (train the same settings with PRESET "
             f"'two_stage' and compare both)" for run, sft in counterparts.items() if sft is None]
    for (run, sft, split), part in comparison.groupby(["run", "sft counterpart", "split"], sort=False):
        by = part.set_index("measure")

        def say(measure):
            r = by.loc[measure]
            interval = "" if pd.isna(r.ci_lo) else f" [{r.ci_lo:+.3f}, {r.ci_hi:+.3f}]"
            return f"{measure} {r.sft:.3f} -> {r.dpo:.3f} ({r.difference:+.3f}{interval})"

        parts.append(f"{run} vs {sft}, {split}: optimised: {say('GREEN Whole report')}; not optimised: "
                     + "; ".join(say(m) for m in ("BLEU-4 (whole report)", "CIDEr (whole report)", "mean words",
                                                  "distinct reports")))
    return "\n".join(parts) or "no run with a preference stage among the compared runs"


def write_preference_outputs(comparison, lengths, artifacts) -> list:
    files = {artifacts.compare_dir / "report_lengths.csv": lengths.to_csv(),
             artifacts.compare_dir / "preference_vs_sft.csv": comparison.to_csv(index=False)}
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)
