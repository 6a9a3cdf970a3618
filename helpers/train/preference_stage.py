"""Notebook 02's preference stage (preset `two_stage_dpo`) before DPO trains: the stage-2 model's candidate reports,
their GREEN rewards and pairs (helpers/train/preference.py), and the DPO datasets; one model loaded at a time
(training.train runs the phases and then TRL's DPOTrainer)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights

from . import preference
from ..core.data import study_images
from ..model.generation import default_max_new_tokens, generate_batch, sample_batch
from ..core.settings import processes
from ..core.storage import atomic_write_json, free_gpu_memory, open_store, run_sharded, sha256
from .examples import preference_dataset
from .recipe import mixed_precision


def preference_studies(config: dict, train_studies, holdout_studies) -> list:
    """The studies the preference stage samples candidates for: the first `studies` to train on (all: None) and every
    held-out one (their pairs give the held-out preference loss)."""
    return [*train_studies[:config["preference"]["studies"]], *holdout_studies]


def generate_candidates(model, processor, config: dict, weights_dir: Path, run, studies) -> dict:
    """Per study, the greedy report and `candidates` sampled ones of the weights in `weights_dir` (stage 2's), into
    the run's candidates.jsonl through the batch runner (resumable), under the training autocast; returns the
    runner's counts and seconds."""
    settings = config["preference"]
    set_peft_model_state_dict(model, load_peft_weights(str(weights_dir)))
    model.eval()
    max_new_tokens = default_max_new_tokens(config)

    def generate(batch):
        views, ids = [study_images(s, config["max_views"]) for s in batch], [s.id for s in batch]
        with mixed_precision(config):
            greedy = generate_batch(model, processor, views, ids, max_new_tokens=max_new_tokens)
            sampled = sample_batch(model, processor, views, n=settings["candidates"],
                                   temperature=settings["temperature"], max_new_tokens=max_new_tokens,
                                   seed=int(sha256(str(config["seed"]), *ids)[:8], 16))
        keep = ("text", "regions", "parsed", "n_tokens")
        return [{"id": i, "candidates": [{**{k: g[k] for k in keep}, "sampled": False},
                                         *({**c, "sampled": True} for c in samples)],
                 "non-finite samples": settings["candidates"] - len(samples)}  # left out by sample_batch
                for i, g, samples in zip(ids, greedy, sampled)]

    # each study's batch row expands to 1 + `candidates` sequences
    _, counts = run_sharded(open_store(run.candidates_path, key_field="id"), studies, lambda s: s.id, generate,
                            batch_size=max(1, config["generate_batch_size"] // (1 + settings["candidates"])),
                            desc="preference candidates", unit="study")
    free_gpu_memory()
    return counts


def make_preference_pairs(run, config: dict, train_studies, holdout_studies, judge, sampling: dict) -> None:
    """The candidates' GREEN rewards (`preference.candidate_rewards`), then one pair per study where they differ
    enough: preferences_summary.json (counts, lengths, this session's seconds per unit, for the smoke's projection),
    then preferences.jsonl, whose presence marks the phase done."""
    state = processes()
    studies = preference_studies(config, train_studies, holdout_studies)
    store = open_store(run.candidates_path, key_field="id")
    candidates = {s.id: store.get(s.id) for s in studies}
    cached, start = len(judge.store.records), time.time()
    rewards = preference.candidate_rewards(studies, candidates, judge)
    judged, judge_seconds = len(judge.store.records) - cached, time.time() - start
    judge.release()  # the training model loads next
    pairs, counts = preference.preference_pairs(studies, candidates, rewards, config["preference"],
                                                {s.id for s in holdout_studies})
    summary = {**counts, "lengths": preference.length_summary(pairs),
               "seconds per study sampled": (round(sampling["seconds"] / sampling["done_now"], 3)
                                             if sampling["done_now"] else None),  # None: all sampled earlier
               "region pairs judged": judged, "seconds per judged pair": round(judge_seconds / judged, 3) if judged else None}
    print(f"preference pairs: {json.dumps(summary)}")
    if state.is_main_process:
        atomic_write_json(run.preference_summary_path, summary)
        preference.write_pairs(run.preferences_path, pairs)
    state.wait_for_everyone()


def preference_datasets(run, config: dict, studies) -> tuple:
    """(train, held-out) DPO datasets from preferences.jsonl; held-out None when no held-out study gave a pair
    (then the stage keeps its last weights)."""
    pairs, by_id = preference.read_pairs(run.preferences_path), {s.id: s for s in studies}
    train_pairs, held_pairs = [p for p in pairs if not p["held_out"]], [p for p in pairs if p["held_out"]]
    if not train_pairs:
        raise ValueError(f"{run.preferences_path}: no preference pair to train on "
                         f"({run.preference_summary_path.read_text(encoding='utf-8').strip()}): more DPO_STUDIES or "
                         f"DPO_CANDIDATES, under a new RUN_NAME, give rewards more chances to differ")
    if not held_pairs:
        print("WARNING: no held-out study gave a preference pair: the preference stage keeps its last weights")
    return (preference_dataset(train_pairs, by_id, config["max_views"]),
            preference_dataset(held_pairs, by_id, config["max_views"]) if held_pairs else None)
