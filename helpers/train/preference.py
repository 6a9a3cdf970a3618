"""Notebook 02's preference stage (preset `two_stage_dpo`): rewards of the stage-2 model's candidate reports from
the project's GREEN judge, per region against the provided split, and the chosen / rejected pairs DPO trains on.

The phases run one model at a time (training.train): the stage-2 model samples the candidates (a resumable JSONL),
is released, the GREEN judge scores them (its cache, `eval/green_cache.jsonl`, shared with notebook 04), is
released, and the training model loads again for TRL's DPOTrainer. `cost_table` is the stage's computed cost.
"""
from __future__ import annotations

import json
import math
import statistics

from ..core.data import REGIONS, load_studies
from ..judge.judge import DEFAULT_ENGINE, Judge, score_response
from ..core.settings import torch_dtype
from ..core.storage import atomic_write_text

CANDIDATES = 4  # sampled reports per study, beside the greedy one
TEMPERATURE = 0.7  # sampling for candidates only: evaluation stays greedy
BETA = 0.1  # DPO's KL strength (TRL's default)
MIN_GAP = 0.1  # a pair's reward gap must reach this: closer rewards are within the judge's noise
LENGTH_MARGIN = 0.05  # rewards this close count as tied, and the shorter report wins: against length exploitation


def preference_settings(*, candidates: int = CANDIDATES, studies: int | None = None, beta: float = BETA,
                        judge: str) -> dict:
    """config.json's "preference": what makes the pairs and the stage (a resumed run must keep them)."""
    return {"candidates": candidates, "studies": studies, "temperature": TEMPERATURE, "beta": beta,
            "min_gap": MIN_GAP, "length_margin": LENGTH_MARGIN, "judge": judge}


def make_judge(settings, artifacts, model_id: str | None = None, engine: str | None = None,
               url: str | None = None) -> Judge:
    """The GREEN judge notebook 04 uses, with its cache, the settings' precision and the engine (None: the default,
    `judge.DEFAULT_ENGINE`; demo: the tiny judge)."""
    from ..demo.tiny_models import judge_id  # builds the demo judge; imports the stand-ins' libraries
    from ..core.settings import get_secret

    studies = load_studies(settings.data_dir) if settings.offline else []  # the demo judge's vocabulary, as in 04
    return Judge(judge_id(settings, artifacts, studies, model_id), artifacts.judge_cache,
                 load_in_4bit=settings.judge_4bit, dtype=torch_dtype(settings.judge_precision),
                 token=get_secret("HF_TOKEN"), batch_size=settings.judge_batch_size,
                 max_new_tokens=settings.judge_max_new_tokens, engine=engine or DEFAULT_ENGINE, url=url)


def needs_judge(reference: str, candidate: str) -> bool:
    return bool(reference) and bool(candidate)


def region_reward(reference: str, candidate: str, green: float | None = None) -> float | None:
    """One region's reward in [0, 1]; None: the judge's answer did not parse."""
    if not reference:
        # nothing to find: saying nothing is correct, and any finding written there is a false one
        return 0.0 if candidate else 1.0
    if not candidate:
        return 0.0  # every reference finding missed: GREEN's own value (0 matched findings), without a judge call
    return green


def candidate_rewards(studies, candidates: dict[str, dict], judge: Judge) -> dict[str, list]:
    """{study id: per candidate {"reward": mean over the four regions or None, "regions": {region: reward}}}.

    Every (reference, candidate) region pair with text on both sides goes to the judge in one call (deduplicated,
    cached, batched); a candidate with an unparseable answer in any region gets reward None (counted, never paired).
    """
    pairs = [(study.regions[r], c["regions"][r]) for study in studies for c in candidates[study.id]["candidates"]
             for r in REGIONS if needs_judge(study.regions[r], c["regions"][r])]
    greens = {}
    for pair, record in zip(pairs, judge.judge(pairs) if pairs else []):
        greens[pair] = score_response(record["response"])["green"]
    rewards = {}
    for study in studies:
        rewards[study.id] = []
        for candidate in candidates[study.id]["candidates"]:
            per_region = {r: region_reward(study.regions[r], candidate["regions"][r],
                                           greens.get((study.regions[r], candidate["regions"][r])))
                          for r in REGIONS}
            known = None not in per_region.values()
            rewards[study.id].append({"reward": sum(per_region.values()) / len(REGIONS) if known else None,
                                      "regions": per_region})
    return rewards


def words(text: str) -> int:
    return len(text.split())


def choose_pair(candidates: list[dict], rewards: list[dict], min_gap: float = MIN_GAP,
                length_margin: float = LENGTH_MARGIN) -> dict | None:
    """Chosen: the shortest report among those within `length_margin` of the best reward; rejected: the longest
    among those within it of the worst. None when no two distinct reports are `min_gap` apart."""
    scored = [(r["reward"], c["text"]) for c, r in zip(candidates, rewards) if r["reward"] is not None]
    if not scored:
        return None
    best, worst = max(s for s, _ in scored), min(s for s, _ in scored)
    chosen = min((s for s in scored if s[0] >= best - length_margin), key=lambda s: (words(s[1]), -s[0]))
    rejected = max((s for s in scored if s[0] <= worst + length_margin), key=lambda s: (words(s[1]), -s[0]))
    if chosen[0] - rejected[0] < min_gap or chosen[1] == rejected[1]:
        return None
    return {"chosen": chosen[1], "rejected": rejected[1], "chosen_reward": chosen[0], "rejected_reward": rejected[0],
            "chosen_words": words(chosen[1]), "rejected_words": words(rejected[1])}


def preference_pairs(studies, candidates: dict[str, dict], rewards: dict[str, list], settings: dict,
                     held_out: set[str]) -> tuple[list[dict], dict]:
    """One pair per study where `choose_pair` finds one, and the counts of what was left out and why."""
    pairs, counts = [], {"studies": len(studies), "candidates": 0, "unparseable candidates": 0,
                         "samples left out (non-finite probabilities)": 0, "no pair (rewards within min_gap)": 0}
    for study in studies:
        scored = rewards[study.id]
        counts["candidates"] += len(scored)
        counts["samples left out (non-finite probabilities)"] += candidates[study.id].get("non-finite samples", 0)
        counts["unparseable candidates"] += sum(r["reward"] is None for r in scored)
        pair = choose_pair(candidates[study.id]["candidates"], scored, settings["min_gap"], settings["length_margin"])
        if pair is None:
            counts["no pair (rewards within min_gap)"] += 1
            continue
        pairs.append({"id": study.id, "held_out": study.id in held_out, **pair})
    counts["pairs"] = len(pairs)
    counts["held-out pairs"] = sum(p["held_out"] for p in pairs)
    return pairs, counts


def length_summary(pairs: list[dict]) -> dict:
    """Words of the chosen against the rejected reports: a win that is only length shows here first."""
    def describe(values):
        ordered = sorted(values)
        return {"mean": round(statistics.fmean(ordered), 1), "median": statistics.median(ordered),
                "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)], "max": ordered[-1]}

    if not pairs:
        return {}
    return {"chosen words": describe([p["chosen_words"] for p in pairs]),
            "rejected words": describe([p["rejected_words"] for p in pairs]),
            "chosen longer": sum(p["chosen_words"] > p["rejected_words"] for p in pairs),
            "chosen shorter": sum(p["chosen_words"] < p["rejected_words"] for p in pairs)}


def write_pairs(path, pairs: list[dict]) -> None:
    """preferences.jsonl at once (atomically): its presence says the judge phase is complete."""
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))


def read_pairs(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def lengths_table(summary: dict):
    """preferences_summary.json's word counts of chosen against rejected reports, and in how many pairs each side is
    the longer report, as a table."""
    import pandas as pd

    lengths = summary["lengths"]
    if not lengths:
        return pd.DataFrame()
    return pd.DataFrame({"chosen": {**lengths["chosen words"], "longer in pairs": lengths["chosen longer"]},
                         "rejected": {**lengths["rejected words"], "longer in pairs": lengths["chosen shorter"]}}).T


# ---------------------------------------------------------------- computed cost
# Public specifications: memory bandwidth (GB/s), dense 16-bit tensor throughput (TFLOPS) and memory (GB); the
# utilisations are assumptions of this table, typical of HF generate and of LoRA training, not measurements.
# Weights read per decoding step (GB) as the profiles load them, and the profiles' judge batch.
GPUS = {"T4": {"bandwidth": 320, "tflops": 65, "memory_gb": 15, "weights_gb": 4.2, "judge_gb": 3.9,  # 4-bit
               "judge_batch": 8},
        "A100-40GB": {"bandwidth": 1555, "tflops": 312, "memory_gb": 40, "weights_gb": 15.1, "judge_gb": 13.5,
                      "judge_batch": 16}}
DECODE_UTILISATION, COMPUTE_UTILISATION = 0.5, 0.3
PARAMS, JUDGE_PARAMS = 7.6e9, 6.7e9  # llava-v1.6-mistral-7b, GREEN-RadLlama2-7b
PROMPT_TOKENS, REPORT_TOKENS = 1770, 80  # three base-mode views (3 x 576) + instruction; a report, generous
JUDGE_PROMPT_TOKENS, JUDGE_ANSWER_TOKENS = 700, 250  # GREEN's prompt with two region texts; its mean answer
JUDGE_LONGEST_ANSWER = 600  # GREEN's answers run from about 100 to 600 tokens: a static batch decodes its longest
JUDGE_KV_GB_PER_TOKEN = 0.000524  # Llama-2-7B in fp16: 2 x 32 layers x 4,096 x 2 bytes
JUDGED_REGIONS = 2.5  # region pairs per candidate with text on both sides (lung and heart nearly always)
STUDIES = (2069, 500, 100)


def judge_seconds_per_pair(gpu: dict) -> dict[str, float]:
    """Computed seconds per judged pair of each engine: prefill compute-bound; a decoding step reads the weights and
    the running sequences' KV cache. Static: `judge_batch` pairs decode until the longest answer ends. Continuous
    batching (in process, or a vLLM server: same bound, kernels aside): finished answers leave and new pairs join,
    so each pair costs its mean answer, with as many sequences running as the memory beside the weights holds (1 GB
    kept for the context and activations)."""
    flops = gpu["tflops"] * 1e12 * COMPUTE_UTILISATION
    prefill = 2 * JUDGE_PARAMS * JUDGE_PROMPT_TOKENS / flops
    kv_gb = lambda tokens: tokens * JUDGE_KV_GB_PER_TOKEN
    step = lambda gb: gb / (gpu["bandwidth"] * DECODE_UTILISATION)
    batch = gpu["judge_batch"]
    static = JUDGE_LONGEST_ANSWER * step(gpu["judge_gb"] + batch * kv_gb(JUDGE_PROMPT_TOKENS + JUDGE_LONGEST_ANSWER / 2))
    running = int((gpu["memory_gb"] - gpu["judge_gb"] - 1) / kv_gb(JUDGE_PROMPT_TOKENS + JUDGE_ANSWER_TOKENS))
    continuous = JUDGE_ANSWER_TOKENS * step(gpu["judge_gb"] + running * kv_gb(JUDGE_PROMPT_TOKENS
                                                                             + JUDGE_ANSWER_TOKENS / 2))
    return {"static": prefill + static / batch, "continuous": prefill + continuous / running}


def cost_table(studies=STUDIES, candidates: int = CANDIDATES, gpus: dict = GPUS, engine: str = "continuous"):
    """Computed hours of the preference stage per GPU and number of studies, from `GPUS`' figures and the token counts
    above: decoding is bandwidth-bound (the weights read once per step for a batch of one study's candidates),
    prefill and DPO compute-bound (2 FLOPs per parameter and token forward, 4 more backward and recomputation for the
    policy, 2 for the reference, on chosen and rejected). The judge's hours per engine (`judge_seconds_per_pair`;
    "continuous" also stands for a vLLM server), the total with `engine`'s. Upper bounds in pairs: one per study, no
    judge dedupe; bitsandbytes' 4-bit kernels are slower than bandwidth alone says, so the T4 rows are optimistic."""
    import pandas as pd

    rows = []
    for name, gpu in gpus.items():
        flops = gpu["tflops"] * 1e12 * COMPUTE_UTILISATION
        step = lambda gb: gb / (gpu["bandwidth"] * DECODE_UTILISATION)  # seconds per decoding step
        per_study = ((1 + candidates) * 2 * PARAMS * PROMPT_TOKENS / flops  # prefill of every sequence
                     + REPORT_TOKENS * step(gpu["weights_gb"]))  # one study's candidates decode together
        per_pair = judge_seconds_per_pair(gpu)
        per_dpo_pair = 2 * 8 * PARAMS * (PROMPT_TOKENS + REPORT_TOKENS) / flops
        for n in studies:
            judged = n * (1 + candidates) * JUDGED_REGIONS
            judge = {f"judge, {e} (h)": judged * seconds / 3600 for e, seconds in per_pair.items()}
            hours = {"candidates (h)": n * per_study / 3600, f"judge, {engine} (h)": judge[f"judge, {engine} (h)"],
                     "DPO, one epoch (h)": n * per_dpo_pair / 3600}
            rows.append({"GPU": name, "DPO_STUDIES": n, "candidate reports": n * (1 + candidates),
                         "judged region pairs": round(judged), "candidates (h)": round(hours["candidates (h)"], 2),
                         **{k: round(v, 2) for k, v in judge.items()},
                         "DPO, one epoch (h)": round(hours["DPO, one epoch (h)"], 2),
                         f"total with {engine} (h)": round(sum(hours.values()), 2)})
    table = pd.DataFrame(rows).set_index(["GPU", "DPO_STUDIES"])
    table.attrs["note"] = ("computed from public GPU specifications and the assumptions in helpers/train/preference.py "
                           "(GPUS, utilisations, token counts), not measured; a smoke run measures")
    return table
