"""Where every artifact lives: the one owner of the layout under ARTIFACTS_DIR.

    regions/        val_regions.json, annotation_with_val.json, cache.jsonl      (notebook 01)
    models/         tiny-llava/, tiny-green-format-judge/                         (demo stand-ins)
    train/<run>/    config.json, metrics.json, loss.png, adapter/, checkpoints/ (notebook 02);
                    two_stage_dpo: candidates.jsonl, preferences.jsonl, preferences_summary.json;
                    hub/ (python -m helpers push)
    generate/<run>/ predictions_val.jsonl, predictions_test.jsonl, attention/  (notebook 03);
                    predictions_test_{blank,shuffled}.jsonl (grounding), predict/ (python -m helpers predict)
    eval/           green_cache.jsonl, retrieval_neighbors.json                 (notebook 04, shared by runs)
    eval/<run>/     green tables, per-pair judgments, plots/                    (notebook 04)
    eval/compare/   every run and baseline side by side, paired differences, NLG metrics, grounding.csv, report.md,
                    plots/

While `python -m helpers generate | evaluate` runs in N processes, each appends to its own shard next to the file it
fills (predictions_test.process-0.jsonl, green_cache.process-1.jsonl, ...); the main process merges them into it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingError, OptionError

SPLIT_NAMES = {"val": "Validation", "test": "Testing"}  # the splits generated and scored, as tables name them


@dataclass(frozen=True)
class Run:
    """One fine-tuning run and everything made from it, by name."""
    artifacts_dir: Path
    name: str

    @property
    def train_dir(self) -> Path:
        return self.artifacts_dir / "train" / self.name

    @property
    def config_path(self) -> Path:
        return self.train_dir / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.train_dir / "metrics.json"

    @property
    def adapter_dir(self) -> Path:
        return self.train_dir / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.train_dir / "checkpoints"

    @property
    def trained(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    @property
    def config(self) -> dict:
        """The run's settings as notebook 02 wrote them."""
        if not self.config_path.is_file():
            raise MissingError(f"{self.config_path} not found: train run {self.name!r} with notebook 02 "
                                    f"(python -m helpers train) first (or check RUN_NAME)")
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    @property
    def candidates_path(self) -> Path:
        """The preference stage's candidate reports per study (two_stage_dpo)."""
        return self.train_dir / "candidates.jsonl"

    @property
    def preferences_path(self) -> Path:
        """The preference pairs DPO trains on: id, chosen, rejected, their rewards and lengths."""
        return self.train_dir / "preferences.jsonl"

    @property
    def preference_summary_path(self) -> Path:
        return self.train_dir / "preferences_summary.json"

    @property
    def generate_dir(self) -> Path:
        return self.artifacts_dir / "generate" / self.name

    def predictions(self, split: str) -> Path:
        return self.generate_dir / f"predictions_{split}.jsonl"

    @property
    def attention_dir(self) -> Path:
        return self.generate_dir / "attention"

    @property
    def eval_dir(self) -> Path:
        return self.artifacts_dir / "eval" / self.name


@dataclass(frozen=True)
class Artifacts:
    """The artifact folder of a project (Drive in Colab, artifacts/ here)."""
    root: Path

    @property
    def regions_dir(self) -> Path:
        return self.root / "regions"

    @property
    def split_annotation(self) -> Path:
        """annotation.json with notebook 01's region split of the val reports."""
        return self.regions_dir / "annotation_with_val.json"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def judge_cache(self) -> Path:
        return self.root / "eval" / "green_cache.jsonl"

    @property
    def compare_dir(self) -> Path:
        return self.root / "eval" / "compare"

    @property
    def retrieval_neighbors(self) -> Path:
        return self.root / "eval" / "retrieval_neighbors.json"

    def run(self, name: str) -> Run:
        return Run(self.root, name)

    def runs(self) -> list[Run]:
        """Every run with a config.json, in the order they were started."""
        configs = sorted((self.root / "train").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        return [self.run(p.parent.name) for p in configs]

    def find_run(self, name: str | None = None) -> Run:
        """The trained run named `name`, or the only one there is (notebook 03)."""
        ready = [r for r in self.runs() if r.trained]
        names = [r.name for r in ready]
        if not ready:
            raise MissingError(f"{self.root}: no trained run yet: train one with notebook 02 "
                                    f"(python -m helpers train)")
        if name is None and len(ready) == 1:
            return ready[0]
        if name is None:
            raise OptionError(f"{self.root}: several runs: set RUN_NAME to one of {names}")
        if name not in names:
            raise MissingError(f"{self.root}: run {name!r} is not trained: train it with notebook 02 "
                                    f"(python -m helpers train), or set "
                                    f"RUN_NAME to one of {names}")
        return self.run(name)

    def find_runs(self, names: list[str] | None = None) -> list[Run]:
        """The runs named, or every run with predictions for both splits in the order trained (notebook 04)."""
        generated = [p.parent.name for p in (self.root / "generate").glob("*/predictions_test.jsonl")]
        ready = [r for r in map(self.run, generated) if all(r.predictions(s).is_file() for s in SPLIT_NAMES)]
        started = {r.name: i for i, r in enumerate(self.runs())}  # runs without a train folder (copied in) go last
        ready.sort(key=lambda r: (started.get(r.name, len(started)), r.name))
        available = [r.name for r in ready]
        if not ready:
            raise MissingError(f"{self.root}: no predictions yet: run notebook 03 (python -m helpers generate)" +
                                    (f" for {names}" if names else ""))
        missing = [n for n in names or () if n not in available]
        if missing:
            raise MissingError(f"{self.root}: no predictions yet for {missing}: run notebook 03 "
                                    f"(python -m helpers generate) for them, or set "
                                    f"RUN_NAMES to some of {available}")
        return [self.run(n) for n in names] if names else ready
