"""The whole quiz's hours per model size on a GPU, computed (never measured) from this data's token counts and
public GPU figures: README's cost table and the free-T4 plan, whose total a test holds to one free Colab session.

The GPU figures, utilisations and token assumptions are the preference stage's (`preference.GPUS`,
`COMPUTE_UTILISATION`, `DECODE_UTILISATION`, `REPORT_TOKENS`), the judge's seconds per pair its
`judge_seconds_per_pair`; the settings (4-bit or not, batch) are the ones `settings.for_model` picks for the size.
Training counts 6 FLOPs per parameter and token (forward 2, backward and the checkpointed layers' recomputation 4)
for the language model over every token and the vision tower over its patches, plus the held-out loss at every
save; generation prefills compute-bound and decodes bandwidth-bound, a batch reading the weights and its KV cache
once a step. A smoke run (helpers/preflight/smoke.py) measures your GPU instead.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from transformers import (CLIPVisionConfig, LlavaConfig, LlavaNextConfig, MistralConfig, Qwen2Config,
                          SiglipVisionConfig)

from ..core.data import REGIONS, read_annotation
from ..core.report_format import INSTRUCTION, format_report, whole_report
from ..core.settings import PROFILES, REPO_ROOT, parameter_count, resolve
from ..model.modeling import HUB_PINPOINTS
from ..train.preference import COMPUTE_UTILISATION, DECODE_UTILISATION, GPUS, REPORT_TOKENS, judge_seconds_per_pair
from .gpu_plan import GENERATE_VIEWS, NF4_BYTES, REAL, kv_cache_gib
from .smoke import PAIRS_PER_STUDY, SESSION_HOURS

FREE_T4_HOURS = 4  # the free-T4 plan's bound: a free Colab session runs up to 12 hours, but its GPU time is rationed
HOLDOUT_FRACTION = 0.05  # notebook 02's default: the held-out slice is never trained on
CHARS_PER_TOKEN = 3.5  # prompt and report text (an assumption: BPE tokenizers average ~4 characters in English)
TEMPLATE_TOKENS = 30  # the chat template's role tags and separators around a study's prompt and report
# Set-up, assumed: the pinned stack installed, the models downloaded at ~100 MB/s and loaded (docs/testing.md)
SETUP_HOURS = {"stack install": 4 / 60, "downloads and loads": 10 / 60}


def interleave_config():
    """llava-interleave-qwen-0.5b-hf's architecture: a SigLIP so400m tower at 384 px (729 patches, no CLS) and a
    Qwen1.5-0.5B language model, with the published shapes of both (not read from the hub here)."""
    return LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                         num_attention_heads=16, image_size=384, patch_size=14),
        text_config=Qwen2Config(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=729)


def llava_next_config():
    """llava-v1.6-mistral-7b-hf's architecture, at the shapes `make gpu-check` builds (gpu_plan.REAL)."""
    return LlavaNextConfig(vision_config=CLIPVisionConfig(**REAL["llava"]["vision"], image_size=336, patch_size=14),
                           text_config=MistralConfig(**REAL["llava"]["text"]), image_grid_pinpoints=HUB_PINPOINTS,
                           vision_feature_layer=-2, vision_feature_select_strategy="default")


# Per size: the checkpoint, its architecture and image tokens per view (the 7B in the default "base" mode)
SIZES = {"0.5B": {"model_id": "llava-hf/llava-interleave-qwen-0.5b-hf", "config": interleave_config,
                  "tokens_per_view": 729},
         "7B": {"model_id": "llava-hf/llava-v1.6-mistral-7b-hf", "config": llava_next_config, "tokens_per_view": 576}}


SHARED_ANNOTATION = REPO_ROOT.parent / "shared" / "iu_xray" / "annotation.json"
# What `data_counts` counts in IU X-Ray's annotation.json (the quiz's data, not in this repository): a test recounts
# it wherever the file is present, so the table needs the file only to be checked
IU_XRAY = {"annotation": "IU X-Ray's annotation.json", "studies": {"train": 2069, "val": 296, "test": 590},
           "text_tokens": 141, "template_pairs": 2779}


def data_counts(annotation_path: Path) -> dict:
    """From an annotation: studies per split, the mean text tokens of a training example (instruction + target
    report, at CHARS_PER_TOKEN, + TEMPLATE_TOKENS), and the template baseline's distinct GREEN pairs: its text is one
    per region, so its pairs are the distinct references per region and whole report; a study without a region split
    (the raw val, split by notebook 01) counts all its pairs, an upper bound."""
    annotation = read_annotation(annotation_path)
    studies = {split: len(annotation.get(split, [])) for split in ("train", "val", "test")}
    train = [e["report"] for e in annotation["train"] if isinstance(e.get("report"), dict)]
    text = sum(len(INSTRUCTION) + len(format_report(r)) for r in train) / len(train) / CHARS_PER_TOKEN
    references = [e.get("report") for split in ("val", "test") for e in annotation.get(split, [])]
    split = [r for r in references if isinstance(r, dict)]
    distinct = sum(len({r[region] for r in split}) for region in REGIONS) + len({whole_report(r) for r in split})
    return {"annotation": str(annotation_path), "studies": studies, "text_tokens": round(text + TEMPLATE_TOKENS),
            "template_pairs": distinct + PAIRS_PER_STUDY * (len(references) - len(split))}


def quiz_counts() -> dict:
    """The quiz data's counts: recounted from ../shared/iu_xray/annotation.json when present, else IU_XRAY."""
    return data_counts(SHARED_ANNOTATION) if SHARED_ANNOTATION.is_file() else IU_XRAY


def _weights_gb(language: int, vision: int, load_in_4bit: bool) -> float:
    """GB read per decoding step: 4-bit language weights as nf4 (gpu_plan.NF4_BYTES), the rest in 16 bits."""
    return (language * (NF4_BYTES if load_in_4bit else 2) + vision * 2) / 1e9


def free_t4_model(model_id: str | None, free_t4: bool, settings) -> str | None:
    """Notebook 02's MODEL_ID under FREE_T4 (the free-T4 plan): the 0.5B where none is given; the demo keeps its tiny
    model. FREE_T4 in notebooks 03 and 04 turns off the grounding check, the retrieval baseline and RadEval's metrics,
    which the plan leaves out."""
    return model_id or (SIZES["0.5B"]["model_id"] if free_t4 and not settings.offline else None)


def plan_hours(size: str, gpu: str = "T4", *, epochs: int | None = None, views: int = GENERATE_VIEWS,
               baselines: tuple[str, ...] = ("template",), counts: dict | None = None) -> dict:
    """Computed hours of each step for one run of `size` on `gpu` (a `preference.GPUS` name): the rules split
    (seconds on the CPU: 0), training at the profile's epochs, val and test generated, GREEN per region for the run
    and `baselines` ("template"; "retrieval" as an upper bound in pairs), with its assumptions."""
    figures, counts = GPUS[gpu], counts or quiz_counts()
    spec = SIZES[size]
    config = spec["config"]()
    total = parameter_count(config)
    vision = parameter_count(config, "model.vision_tower")
    language = total - vision
    profile = {"T4": "t4", "A100-40GB": "a100"}[gpu]
    settings = replace(resolve(profile), gpu_memory_gb=figures["memory_gb"])  # the profile on that GPU
    sized = settings.for_model(total)
    epochs = epochs or PROFILES[profile]["epochs"]
    flops = figures["tflops"] * 1e12 * COMPUTE_UTILISATION
    image = views * spec["tokens_per_view"]
    tokens = image + counts["text_tokens"]
    forward = 2 * (language * tokens + vision * image)  # FLOPs of one study's forward pass
    train_studies = counts["studies"]["train"]
    held = max(2, math.ceil(HOLDOUT_FRACTION * train_studies))
    steps = epochs * math.ceil((train_studies - held) / (settings.batch_size * settings.grad_accum))
    training = (epochs * (train_studies - held) * 3 * forward  # forward + backward and recomputation
                + steps / settings.save_steps * held * forward) / flops  # the held-out loss at each save
    generated = counts["studies"]["val"] + counts["studies"]["test"]
    batch = settings.generate_batch_size
    step = (_weights_gb(language, vision, sized.inference_4bit)
            + kv_cache_gib(config.text_config.to_dict(), batch, tokens + REPORT_TOKENS / 2) * 2**30 / 1e9
            ) / (figures["bandwidth"] * DECODE_UTILISATION)
    generation = generated * (forward / flops + REPORT_TOKENS * step / batch)
    pairs = generated * PAIRS_PER_STUDY + sum(counts["template_pairs"] if b == "template" else
                                              generated * PAIRS_PER_STUDY for b in baselines)
    judging = pairs * judge_seconds_per_pair(figures)["continuous"]
    hours = {"split (rules, CPU)": 0.0, "training": training / 3600, "generation": generation / 3600,
             "GREEN (continuous judge)": judging / 3600, **SETUP_HOURS}
    return {"size": size, "model_id": spec["model_id"], "gpu": gpu, "parameters": total,
            "training": f"{'QLoRA (4-bit)' if sized.load_in_4bit else 'LoRA, 16-bit'}, {epochs} epochs, "
                        f"{views} views x {spec['tokens_per_view']} image tokens + {counts['text_tokens']} text",
            "inference 4-bit": sized.inference_4bit, "optimizer steps": steps, "generated studies": generated,
            "judged pairs": pairs, "baselines": list(baselines), "hours": {k: round(v, 2) for k, v in hours.items()},
            "total hours": round(sum(hours.values()), 2), "session hours": SESSION_HOURS,
            "assumes": f"{COMPUTE_UTILISATION:.0%} of {figures['tflops']} TFLOP/s 16-bit peak for prefill and "
                       f"training, {DECODE_UTILISATION:.0%} of {figures['bandwidth']} GB/s while decoding "
                       f"(helpers/train/preference.py); {CHARS_PER_TOKEN} characters a text token; "
                       f"{counts['annotation']}"}


def free_t4_plan(counts: dict | None = None) -> dict:
    """The quiz in one free T4 session, what FREE_T4 = True runs (`free_t4_model`): the 0.5B trained with the
    defaults, val and test generated, GREEN for the run and the template baseline; `fits`: within FREE_T4_HOURS."""
    plan = plan_hours("0.5B", "T4", counts=counts)
    return {**plan, "bound hours": FREE_T4_HOURS, "fits": plan["total hours"] <= FREE_T4_HOURS}


def readme_table(counts: dict | None = None) -> str:
    """README's cost table, one row per model size on a T4 (markdown), every step's computed hours."""
    counts = counts or quiz_counts()
    rows = [plan_hours(size, "T4", counts=counts) for size in SIZES]
    steps = list(rows[0]["hours"])
    lines = ["| model size (T4, computed) | training | " + " | ".join(f"{s} (h)" for s in steps) + " | total (h) |",
             "|---" * (len(steps) + 3) + "|"]
    lines += [f"| {r['size']}: `{r['model_id']}` | {r['training']} | "
              + " | ".join(f"{r['hours'][s]:.2f}" for s in steps) + f" | **{r['total hours']:.2f}** |" for r in rows]
    return "\n".join(lines)
