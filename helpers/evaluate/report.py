"""eval/compare/report.md: the submission's report, assembled from the artifacts alone (notebook 04 and `evaluate`
write it last). Every number is read from a file another step wrote: green_compare.csv, green_stats.csv,
green_diff.csv, nlg.csv, clinical.csv, rexrank_iu_xray.csv, grounding.csv and each run's config.json and
metrics.json; nothing is typed here. A file that is missing makes its section say so."""
from __future__ import annotations

import io
import json
import math
import platform
from importlib import metadata
from pathlib import Path

import pandas as pd

from .green import PROTOCOL, TABLE_COLUMNS, markdown_table
from .grounding import in_words as grounding_in_words
from ..core.report_format import REPORT
from ..core.storage import atomic_write_text

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "green-score",
            "radeval", "pycocoevalcap", "pydicom", "huggingface_hub", "pandas", "numpy")
NLG_COLUMNS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
DEMO_NOTE = ("> **Demo profile.** Tiny random models built offline, trained a few steps on the bundled sample; the "
             "judge and RadEval's models are random stand-ins. Every number below only shows that the code runs: "
             "**the numbers mean nothing.**")


def frame_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a markdown table (its index as the first columns); floats to `digits`, NaN as n/a."""
    frame = frame.reset_index() if frame.index.name or any(frame.index.names) else frame

    def cell(value):
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|---" * len(frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def with_intervals(frame: pd.DataFrame, bounds: dict[str, tuple[str, str]] | None = None,
                   digits: int = 3) -> pd.DataFrame:
    """Each value with its 95% interval in one cell, "v [lo, hi]": `bounds` maps a column to its (lo, hi) columns,
    by default every column with "<column> lo" / "<column> hi" beside it; the bound columns are dropped."""
    bounds = bounds or {c: (f"{c} lo", f"{c} hi") for c in frame.columns if f"{c} lo" in frame and f"{c} hi" in frame}
    out = frame.drop(columns=[b for pair in bounds.values() for b in pair]).astype(object)
    for column, (low, high) in bounds.items():
        out[column] = [value if pd.isna(value) else f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                       for value, lo, hi in zip(frame[column], frame[low], frame[high])]
    return out


def green_tables(compare: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """green_compare.csv back into {system: (table, ci)} as `green.tables_by_system` made them."""
    bounds = [f"{c} {end}" for c in TABLE_COLUMNS for end in ("lo", "hi")]
    return {system: (part.droplevel("system")[TABLE_COLUMNS], part.droplevel("system")[bounds])
            for system, part in compare.groupby(level="system", sort=False)}


def read_compare(artifacts) -> pd.DataFrame:
    return pd.read_csv(artifacts.compare_dir / "green_compare.csv", index_col=[0, 1]).rename_axis(["system", "split"])


def _stage_hours(record: dict) -> str:
    return f"{record['seconds'] / 3600:.2f}" if record.get("seconds") is not None else "n/a"


def size_in_words(parameters: int) -> str:
    """"0.89 B parameters"; a tiny stand-in's in millions."""
    return f"{parameters / 1e9:.2f} B parameters" if parameters >= 1e8 else f"{parameters / 1e6:.2f} M parameters"


def method(run) -> str:
    """One run's training, from its config.json and metrics.json."""
    config = run.config
    metrics = json.loads(run.metrics_path.read_text(encoding="utf-8")) if run.metrics_path.is_file() else {"stages": []}
    lora = config["lora"]
    effective = config["batch_size"] * config["grad_accum"] * config.get("processes", 1)
    size = config.get("parameters")  # runs trained before it was recorded have neither
    rows = {"model": config["model_id"], "family": config.get("family", "n/a"),
            "size": size_in_words(size) if size else "n/a", "visual tokens": config["visual_tokens"],
            "views per study": config["max_views"],
            "preset": config["preset"], "stages": " → ".join(s["name"] for s in config["stages"]),
            "LoRA r / alpha / dropout": f"{lora['r']} / {lora['alpha']} / {lora['dropout']}",
            "epochs (profile)": config["epochs"],
            "effective batch": f"{effective} ({config['batch_size']} x {config['grad_accum']} accumulation x "
                               f"{config.get('processes', 1)} processes)",
            "precision": config["precision"], "4-bit base": config["load_in_4bit"],
            # each stage records the GPU it ran on (a run may resume on another); the CPU: None
            "GPU": ", ".join(dict.fromkeys(r.get("gpu") or "none (CPU)" for r in metrics["stages"])) or "n/a",
            "train studies": config.get("n_train", "n/a"), "held-out studies": len(config.get("holdout_ids", []))}
    head = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    stages = pd.DataFrame([{"stage": f"{r['stage']}: {r['name']}", "epochs": r.get("epochs"), "lr": r.get("lr"),
                            "steps": r.get("global_step"), "hours": _stage_hours(r),
                            "peak GPU GiB": r.get("peak_gpu_memory_gb") or "n/a",
                            "selected checkpoint": r.get("best_checkpoint") or "last",
                            "best held-out loss": r.get("best_eval_loss")} for r in metrics["stages"]])
    stage_table = (frame_markdown(stages, digits=4) if len(stages) else
                   "metrics.json not written yet (training unfinished)")
    return f"| setting | value |\n|---|---|\n{head}\n\n{stage_table}"


def versions() -> str:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return ", ".join(f"{k} {v}" for k, v in found.items())


def _optional(path: Path, read, missing: str):
    return read(path) if path.is_file() else missing


def _rexrank(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    note, _, table = text.partition("\n")
    return f"{note.lstrip('# ')}\n\n" + frame_markdown(pd.read_csv(io.StringIO(table), index_col=0))


def _grounding(table: pd.DataFrame) -> str:
    verdicts = "\n\n".join(grounding_in_words(table).splitlines())  # one paragraph per run
    return (f"{verdicts}\n\n`unchanged`: share of the studies whose text is identical to the report from the real "
            f"views; GREEN of the ablated reports and of the real ones over the same studies; difference = ablated - "
            f"real, 95% paired bootstrap interval.\n\n"
            f"{frame_markdown(with_intervals(table, {'difference': ('ci_lo', 'ci_hi')}))}\n\n"
            f"![grounding](plots/grounding.png)")


def build(artifacts, demo: bool = False) -> str:
    """report.md's text from the artifacts (see the module docstring)."""
    compare = read_compare(artifacts)
    tables = green_tables(compare)
    runs = [s for s in tables if artifacts.run(s).config_path.is_file()]
    baselines = [s for s in tables if s not in runs]
    stats = pd.read_csv(artifacts.compare_dir / "green_stats.csv")
    counts = stats.groupby(["system", "split"], sort=False)[["studies", "scored", "unparseable", "both_empty",
                                                              "ref_empty_pred", "truncated"]].agg(
        {"studies": "max", "scored": "sum", "unparseable": "sum", "both_empty": "sum", "ref_empty_pred": "sum",
         "truncated": "sum"})
    diff = pd.read_csv(artifacts.compare_dir / "green_diff.csv")
    nlg = pd.read_csv(artifacts.compare_dir / "nlg.csv")
    nlg = nlg[nlg.region == REPORT].set_index(["system", "split"])[NLG_COLUMNS]
    parts = ["# Chest X-ray report generation per anatomical region: results", *([DEMO_NOTE] if demo else []),
             f"Written by notebook 04 (`python -m helpers evaluate`) from `{artifacts.root}`: every number is read "
             f"from the files named in each section. Judge: {', '.join(compare.judge.unique())}."]
    parts.append("## GREEN per region, Validation and Testing (95% bootstrap intervals)\n\n" + PROTOCOL)
    for system in runs:
        parts.append(f"### {system}\n\n{markdown_table(*tables[system])}")
    parts.append("## Baselines, judged the same way\n\n" + "\n\n".join(
        f"### {system}\n\n{markdown_table(*tables[system])}" for system in baselines) if baselines else
        "## Baselines\n\nnone were judged (a smoke run skips them)")
    parts.append("## Paired differences against the reference run (`green_diff.csv`: run - reference, 95% paired "
                 "bootstrap interval; shares of studies won, tied, lost)\n\n" + (frame_markdown(with_intervals(
                     diff[["run", "reference", "split", "region", "studies", "difference", "ci_lo", "ci_hi", "wins",
                           "ties", "losses"]], {"difference": ("ci_lo", "ci_hi")})) if len(diff) else
                     "one run only: nothing to pair"))
    parts.append("## Protocol counts (`green_stats.csv`, summed over the regions and the whole report)\n\n"
                 + frame_markdown(counts))
    parts.append("## NLG on whole reports, R2Gen-cleaned text (`nlg.csv`)\n\n" + frame_markdown(nlg))
    parts.append("## RadEval's clinical metrics, whole reports (`clinical.csv`, 95% bootstrap intervals)\n\n"
                 + _optional(artifacts.compare_dir / "clinical.csv",
                             lambda p: frame_markdown(with_intervals(pd.read_csv(p, index_col=[0, 1]))),
                             "not computed (CLINICAL = False)"))
    parts.append("## ReXrank's IU X-Ray row (`rexrank_iu_xray.csv`)\n\n" + _optional(
        artifacts.compare_dir / "rexrank_iu_xray.csv", _rexrank, "not computed (CLINICAL = False)"))
    parts.append("## Does the model look at the X-ray? (`grounding.csv`)\n\n" + _optional(
        artifacts.compare_dir / "grounding.csv", lambda p: _grounding(pd.read_csv(p)),
        "not computed: notebook 03 with GROUNDING_STUDIES > 0, then notebook 04"))
    parts.append("## Method, per run (`train/<run>/config.json`, `metrics.json`)\n\n" + "\n\n".join(
        f"### {name}\n\n{method(artifacts.run(name))}" for name in runs))
    parts.append(f"## Package versions (the environment that wrote this report)\n\n{versions()}")
    return "\n\n".join(parts) + "\n"


def write(artifacts, demo: bool = False) -> Path:
    path = artifacts.compare_dir / "report.md"
    atomic_write_text(path, build(artifacts, demo))
    return path
