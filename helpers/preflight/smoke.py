"""SMOKE = True in any notebook (`--smoke` for its command): the same code on the real models with a few studies, so
a failure shows in minutes rather than after hours of training, and a projection of the full step's hours.

The smoke's studies: 8 of the train split (2 of them held out), 4 val, 4 test, chosen from the study ids alone. Its
files never mix with the real runs': run "<RUN_NAME>-smoke" in train/, generate/ and eval/ as any run, notebook 01's
split in regions/smoke/, the judge cache and the comparison in eval/smoke/. Each step writes projection.json in its
smoke folder: the measured seconds per unit of work on this GPU, the full step's units from the data's sizes, and
the product, the projected hours.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MissingError
from ..core import runs
from ..core.storage import atomic_write_json, sha256

SUFFIX = "-smoke"
STUDIES = {"train": 8, "val": 4, "test": 4}
# every profile's effective batch is 8 (demo: 2): with 6 studies to train on, one optimizer step per epoch
EPOCHS_PER_STAGE = 2
SAVE_STEPS = 2  # an evaluation and a checkpoint inside each stage, as the full run makes every save_steps
ATTENTION_STUDIES = 1
SESSION_HOURS = 12  # a Colab session's longest (the free tier's)
PAIRS_PER_STUDY = 5  # the four regions and the whole report
BASELINES = 2  # template and retrieval


def run_name(name: str | None, smoke: bool) -> str | None:
    """The run's name as a smoke run ("<name>-smoke"), or as given (None too: the only run)."""
    return f"{name}{SUFFIX}" if smoke and name and not is_smoke(name) else name


def run_names(names: list[str] | None, smoke: bool) -> list[str] | None:
    return names and [run_name(name, smoke) for name in names]


def is_smoke(name: str) -> bool:
    return name.endswith(SUFFIX)


def _first(items, n: int, study_id=lambda s: s.id) -> list:
    """The smoke's n items, ranked by a hash of their id: the same on every rerun, spread over the data."""
    return sorted(items, key=lambda item: sha256("smoke", study_id(item)))[:n]


def training_studies(studies, holdout_fraction: float = 0.05):
    """(train on, held out) for the smoke: 8 train-split studies, cut by `examples.holdout_split` (2 held out)."""
    from ..train.examples import holdout_split  # datasets and the processor's modules: only where a smoke trains

    return holdout_split(_first(studies, STUDIES["train"]), holdout_fraction)


def splits(by_split: dict[str, list]) -> dict[str, list]:
    """{split: the smoke's studies}: 4 val and 4 test, of notebook 03's readable studies or 04's references."""
    return {split: _first(studies, STUDIES[split]) for split, studies in by_split.items()}


def val_reports(reports: dict[str, str]) -> dict[str, str]:
    """Notebook 01's val reports {id: text} for the smoke: those of `splits`' 4 val studies."""
    return {i: reports[i] for i in _first(reports, STUDIES["val"], study_id=str)}


def attention_studies(n: int, smoke: bool) -> int:
    return min(n, ATTENTION_STUDIES) if smoke else n


def training_config(fit, held, stages: list[dict]) -> dict:
    """`training.make_config`'s keywords for the smoke run: the full run's stages (`training.resolve_stages`) with
    EPOCHS_PER_STAGE epochs each, and the full run's sizes for the projection."""
    return {"stages": [{**stage, "epochs": EPOCHS_PER_STAGE} for stage in stages], "save_steps": SAVE_STEPS,
            "logging_steps": 1, "full_run": {"n_train": len(fit), "n_holdout": len(held), "stages": stages}}


@dataclass(frozen=True)
class Artifacts(runs.Artifacts):
    """`runs.Artifacts` for one kind of run: the real runs, where smoke runs do not show, or (smoke=True) the smoke's:
    runs named "<run>-smoke", notebook 01's split in regions/smoke/, the judge cache and comparison in eval/smoke/."""
    smoke: bool = False

    @property
    def regions_dir(self) -> Path:
        return super().regions_dir / "smoke" if self.smoke else super().regions_dir

    @property
    def judge_cache(self) -> Path:
        return self.root / "eval" / "smoke" / "green_cache.jsonl" if self.smoke else super().judge_cache

    @property
    def compare_dir(self) -> Path:
        return self.root / "eval" / "smoke" / "compare" if self.smoke else super().compare_dir

    def runs(self) -> list[runs.Run]:
        return [r for r in super().runs() if is_smoke(r.name) == self.smoke]

    def find_runs(self, names: list[str] | None = None) -> list[runs.Run]:
        if names:
            return super().find_runs(names)
        ready = [r.name for r in super().find_runs() if is_smoke(r.name) == self.smoke]
        if not ready:
            raise MissingError(f"{self.root}: no {'smoke ' if self.smoke else ''}run has predictions yet: run "
                               f"notebook 03 (python -m helpers generate{' --smoke' if self.smoke else ''})")
        return super().find_runs(ready)


# ---------------------------------------------------------------- projections

def verdict(step: str, hours: float, gpu: str) -> str:
    """One line: the full step's projected hours and whether they fit a 12-hour Colab session."""
    fits = (f"fits a {SESSION_HOURS}-hour Colab session" if hours <= SESSION_HOURS else
            f"more than a {SESSION_HOURS}-hour Colab session: about {math.ceil(hours / SESSION_HOURS)} sessions, "
            f"each resuming where the last stopped")
    return f"{step}: projected at {hours:.2f} h on {gpu}: {fits}"


def projection(step: str, settings, *, unit: str, seconds_per_unit: float, units: float, inputs: dict,
               leaves_out: str) -> dict:
    """The record projection.json holds: the measured seconds per unit on this GPU times the full step's units."""
    gpu = (f"{settings.gpu_name} ({settings.gpu_memory_gb} GiB)" if settings.gpu_name else "the CPU")
    hours = units * seconds_per_unit / 3600
    return {"projected from a smoke run": True, "step": step, "gpu": gpu, "profile": settings.profile,
            "precision": settings.precision, "unit": unit, "seconds per unit (measured)": round(seconds_per_unit, 3),
            "units in the full step": units, "inputs": inputs, "hours": round(hours, 3),
            f"fits a {SESSION_HOURS}-hour Colab session": hours <= SESSION_HOURS,
            "leaves out": leaves_out, "verdict": verdict(step, hours, gpu)}


def write(path: Path, record: dict | None) -> str:
    """Write projection.json (atomically); the verdict line to print. None: nothing was measured this time (every
    item came from a cache), and the earlier projection stays."""
    if record is None:
        return f"nothing new was measured (all cached): {path} stays as an earlier smoke run wrote it"
    atomic_write_json(path, record)
    return f"{record['verdict']} ({path})"


def chain_summary(artifacts, run) -> str:
    """Each step's projected hours for `run` (the steps a smoke has projected) and their total against one session."""
    paths = [artifacts.regions_dir, run.train_dir, run.generate_dir, run.eval_dir]
    records = [json.loads((p / "projection.json").read_text()) for p in paths if (p / "projection.json").is_file()]
    lines = [f"  {r['step']}: {r['hours']:.2f} h" for r in records]
    total = verdict("the four full steps together", sum(r["hours"] for r in records), records[-1]["gpu"])
    return "\n".join([f"{run.name}, projected hours of the full steps:", *lines, total])


def split_projection(settings, split_run, seconds: float, n_reports: int) -> dict | None:
    """Notebook 01: seconds per report split now (with the backend's start, e.g. loading a local model) x the val
    reports."""
    if not split_run.n_new:
        return None
    return projection("the full split (notebook 01)", settings, unit="report", seconds_per_unit=seconds / split_run.n_new,
                      units=n_reports, inputs={"val reports": n_reports, "reports split by the smoke": split_run.n_new,
                                               "seconds": round(seconds, 2)},
                      leaves_out="nothing; the backend's start (loading a local model) is in the smoke's seconds, "
                                 "so the projection is an upper bound")


def training_projection(settings, metrics: dict, config: dict) -> dict:
    """Notebook 02: per stage, seconds per training sample (stage seconds over the samples of the steps run now) x
    the full run's samples, as optimizer steps of the effective batch (batch x accumulation x processes)."""
    full = config["full_run"]
    effective_batch = config["batch_size"] * config["grad_accum"] * config["processes"]
    steps_per_epoch = math.ceil(full["n_train"] / effective_batch)
    stages, steps, seconds = [], 0, 0.0
    for record, smoke_stage, full_stage in zip(metrics["stages"], config["stages"], full["stages"]):
        # a preference stage trains on pairs, not studies, and first samples and judges candidates
        pairs = smoke_stage.get("dpo") and record["preference"]["pairs"] - record["preference"]["held-out pairs"]
        # the smoke's samples in the steps this session ran (a resumed stage ran only its last steps)
        samples = ((pairs or config["n_train"]) * smoke_stage["epochs"]
                   * (record["global_step"] - record["resumed_from_step"]) / record["global_step"])
        per_step = record["seconds"] / samples * effective_batch
        units = full["n_train"] if not pairs else _full_pairs(record["preference"], config, full)
        stage_steps = full_stage["epochs"] * math.ceil(units / effective_batch)
        stage = {"stage": full_stage["name"], "epochs": full_stage["epochs"], "optimizer steps": stage_steps,
                 "seconds per optimizer step (measured)": round(per_step, 3),
                 "smoke seconds": record["seconds"], "smoke samples": samples}
        stage_seconds = stage_steps * per_step
        if pairs:
            stage["preference phases"] = _preference_phases(record["preference"], config, full)
            stage_seconds += sum(part["seconds"] for part in stage["preference phases"].values())
        stages.append(stage)
        steps, seconds = steps + stage_steps, seconds + stage_seconds
    return projection("the full training (notebook 02)", settings, unit="optimizer step", seconds_per_unit=seconds / steps,
                      units=steps, inputs={"studies to train on": full["n_train"], "held out": full["n_holdout"],
                                           "batch x accumulation x processes": effective_batch,
                                           "optimizer steps per epoch": steps_per_epoch, "stages": stages},
                      leaves_out="loading the model and the held-out check after each stage (up to 32 studies "
                                 "generated: see generate's seconds per study); the smoke's time includes an "
                                 "evaluation and a checkpoint every 2 steps, the full run's every save_steps; a "
                                 "preference stage's sampling and judging are in its seconds, not in its steps")


def _preference_studies(config: dict, full: dict) -> int:
    """The full run's studies to train on that get candidates: DPO_STUDIES of them (None: all)."""
    chosen = config["preference"]["studies"]
    return min(chosen, full["n_train"]) if chosen else full["n_train"]


def _full_pairs(summary: dict, config: dict, full: dict) -> float:
    """The full run's training pairs at the smoke's rate of pairs per study."""
    return _preference_studies(config, full) * summary["pairs"] / summary["studies"]


def _preference_phases(summary: dict, config: dict, full: dict) -> dict:
    """The preference stage's sampling and judging in the full run: the smoke's seconds per study sampled and per
    judged region pair (0 when this session found them done) x the full run's studies and pairs."""
    studies = _preference_studies(config, full) + full["n_holdout"]
    judged = studies * summary["region pairs judged"] / summary["studies"]
    return {"sampling": {"studies": studies, "seconds per study (measured)": summary["seconds per study sampled"],
                         "seconds": studies * (summary["seconds per study sampled"] or 0)},
            "judging": {"region pairs": round(judged), "seconds per pair (measured)": summary["seconds per judged pair"],
                        "seconds": judged * (summary["seconds per judged pair"] or 0)}}


def generation_projection(settings, speed: dict[str, dict], full: dict[str, list]) -> dict | None:
    """Notebook 03: seconds per study generated now x the readable val and test studies."""
    generated = sum(figures["generated_now"] for figures in speed.values())
    if not generated:
        return None
    seconds = sum(figures["seconds"] for figures in speed.values())
    studies = sum(len(items) for items in full.values())
    return projection("the full generation (notebook 03)", settings, unit="study", seconds_per_unit=seconds / generated,
                      units=studies, inputs={**{f"{split} studies": len(items) for split, items in full.items()},
                                             "studies generated by the smoke": generated,
                                             "seconds": round(seconds, 2)},
                      leaves_out="loading the model and the attention analysis; the smoke's batches are at most 4 "
                                 "studies, so the full run's larger batches may go faster")


def judge_projection(settings, judge, frame, n_runs: int, full: dict[str, list]) -> dict:
    """Notebook 04: the judge's seconds per pair (its cache records of the smoke's pairs, those its engine judged; all
    of them, named, where another engine judged every one) x (runs + 2 baselines) x (val + test studies) x 5 pairs per
    study, before dedupe."""
    records = [judge.store.get(key) for key in frame.key.unique()]
    timed = [r for r in records if r.get("engine", "static") == judge.engine] or records  # no "engine": static's
    seconds = [r["seconds"] for r in timed]
    studies = sum(len(items) for items in full.values())
    pairs = (n_runs + BASELINES) * studies * PAIRS_PER_STUDY
    return projection("the full evaluation (notebook 04)", settings, unit="judged pair",
                      seconds_per_unit=sum(seconds) / len(seconds), units=pairs,
                      inputs={"runs": n_runs, "baselines": BASELINES,
                              **{f"{split} studies": len(items) for split, items in full.items()},
                              "pairs per study": PAIRS_PER_STUDY, "pairs timed by the smoke": len(seconds),
                              "timed by the judge engine": ", ".join(sorted({r.get("engine", "static") for r in timed}))},
                      leaves_out="the retrieval baseline's image embeddings and loading the judge; pairs are "
                                 "counted before dedupe (identical pairs are judged once), an upper bound")
