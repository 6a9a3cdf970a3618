"""`make gpu-check`: QLoRA training, generation and GREEN-judge cost at the real 7B shapes, on random weights.

Models are built offline from configs with the real architectures' shapes, saved to a work folder and loaded back
through the project's own loaders, so the measured path is the one users run; nothing is downloaded. One JSON
(default artifacts/gpu_check.json) is rewritten after each part. `--dry-run` runs every part on the CPU at tiny widths
and checks the JSON's keys (exit status 1 if some are missing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is built locally: a hub lookup would be a bug

import torch  # noqa: E402  (after HF_HUB_OFFLINE, which huggingface_hub reads on import)
from green_score.green import GREEN  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from . import judge, train_data, training  # noqa: E402
from .data import REGIONS, Study, load_studies, study_images  # noqa: E402
from .demo_models import TINY_LLAVA, build_random_judge, build_random_llava, tokenizer_corpus  # noqa: E402
from .generation import generate_batch  # noqa: E402
from .modeling import load_for_inference  # noqa: E402
from .runs import Artifacts, Run  # noqa: E402
from .settings import REPO_ROOT, default_dtype, gpu, peak_gpu_memory_gb, resolve  # noqa: E402
from .storage import atomic_write_json, free_gpu_memory  # noqa: E402

PARTS = ("train", "generate", "judge")
VISUAL_TOKEN_MODES = ("tile", "base")
GENERATE_VIEWS = 2  # a typical IU X-Ray study: frontal + lateral
# Shapes copied from the hub checkpoints' config.json (llava-v1.6-mistral-7b-hf; GREEN-RadLlama2-7b is a Llama-2-7B).
REAL = {"llava": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu"),
                  "text": dict(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                               rope_theta=1e6, rms_norm_eps=1e-5)},
        "judge": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        # ~1,400 tokens learnt: the sample's words become whole tokens, ~430-token prompts as with a full vocabulary
        "judge_tokenizer_vocab": 4000, "name": "7b",
        "warmup_steps": 3, "measured_steps": 5, "generate_batch_sizes": (1, 8), "generate_rounds": 2,
        "max_new_tokens": 64, "judge_pairs": 8}
# Tiny widths with the real image geometry; multiples of 64, so bitsandbytes' 4-bit layers also run on the CPU.
TINY = {"llava": TINY_LLAVA,
        "judge": None,  # build_random_judge's own tiny Llama
        "judge_tokenizer_vocab": 340,  # long prompts: GREEN's 2,048-token budget leaves ~120 tokens to generate
        "name": "tiny", "warmup_steps": 1, "measured_steps": 1, "generate_batch_sizes": (1, 2), "generate_rounds": 1,
        "max_new_tokens": 8, "judge_pairs": 2}
REQUIRED = {"train": ("visual_tokens", "views_per_study", "image_tokens_per_study", "seconds_per_step",
                      "peak_memory_gib"),
            "generate": ("load_in_4bit", "batch_size", "studies_per_s", "generated_tokens_per_s", "peak_memory_gib"),
            "judge": ("loop", "pairs", "new_tokens_per_pair", "generated_tokens_max", "seconds_per_pair")}


def _random_weights() -> dict:
    """Random 7B weights are drawn on the GPU in fp16 (as the hub checkpoints are stored); tiny ones on the CPU."""
    return {"device": "cuda", "dtype": torch.float16} if torch.cuda.is_available() else {}


def build_llava(workdir: Path, sizes: dict, sample: list[Study]) -> Run:
    """A random LLaVA-NeXT saved like a hub checkpoint, with the real image geometry, plus a run holding an untrained
    adapter (LoRA B = 0: outputs unchanged, but generation pays for the LoRA layers as users do) that notebook 03's
    loader reads like a trained one. Idempotent: an existing build is reused.

    Its small tokenizer is trained on the sample's reports: text tokens per study are approximate, image tokens exact.
    """
    run = Artifacts(workdir).run("gpu-check")
    if run.config_path.is_file():
        return run
    model_dir = build_random_llava(workdir / "llava", tokenizer_corpus(sample), image_size=336, widths=sizes["llava"],
                                   **_random_weights())
    config = training.make_config(resolve("t4"), model_id=str(model_dir), max_length=None)
    model, processor = training.load_training_model(config)
    model.save_pretrained(run.adapter_dir)
    processor.save_pretrained(run.adapter_dir)
    atomic_write_json(run.config_path, config)  # last: its presence marks a complete build
    return run


def build_judge(workdir: Path, sizes: dict, sample: list[Study]) -> Path:
    """The tiny judge of the demo (the dry run's judge), or a Llama-2-7B-shaped one with a tokenizer of its kind."""
    widths = {} if sizes["judge"] is None else {"widths": sizes["judge"], **_random_weights()}
    return build_random_judge(workdir / f"judge-{sizes['name']}", tokenizer_corpus(sample),
                              vocab_size=sizes["judge_tokenizer_vocab"], **widths)


def synthetic_studies(workdir: Path, count: int, views: int, sample: list[Study]) -> list[Study]:
    """`count` studies of `views` 512x512 gray views (noise: content does not change the cost), the sample's targets."""
    import numpy as np
    from PIL import Image

    paths = [workdir / "images" / f"view{i}.png" for i in range(views)]
    for i, path in enumerate(paths):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            gray = np.random.default_rng(i).integers(0, 256, (512, 512), dtype=np.uint8)
            Image.fromarray(gray, "L").convert("RGB").save(path)
    targets = [s.regions for s in sample if s.regions]
    return [Study(id=f"synthetic-{views}v-{i}", split="train", regions=targets[i % len(targets)], original_report=None,
                  image_paths=paths) for i in range(count)]


def _free():
    free_gpu_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class StepClock(TrainerCallback):
    """The time at the end of each optimizer step (data loading and collation included, as in a real run)."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        # make_trainer's step-based strategies evaluate and checkpoint after the last step: no part of a step's cost
        control.should_evaluate = control.should_save = False
        return control


def _train_config(mode: str, model_dir: str, stage: dict) -> dict:
    """QLoRA with the t4 profile's precision rule, batch 1, no accumulation, no eval or checkpoint."""
    return training.make_config(resolve("t4"), model_id=model_dir, max_length=None, load_in_4bit=True, stages=[stage],
                                visual_tokens=mode, batch_size=1, grad_accum=1, save_steps=10**6, logging_steps=10**6)


def measure_train(workdir: Path, sizes: dict, sample: list[Study]) -> list[dict]:
    """Seconds per optimizer step and peak memory of QLoRA with the project's trainer, per mode and views per study."""
    model_dir = build_llava(workdir, sizes, sample).config["model_id"]
    # the default preset's second stage trains vision LoRA too: the heavier of its two stages
    stage = {**training.resolve_stages("two_stage", 2)[-1], "epochs": 1}
    warmup, measured = sizes["warmup_steps"], sizes["measured_steps"]
    records = []
    for mode in VISUAL_TOKEN_MODES:
        config = _train_config(mode, model_dir, stage)
        model, processor = training.load_training_model(config)
        training.set_trainable(model, stage)
        for views in (1, 2, 3):
            studies = synthetic_studies(workdir, warmup + measured, views, sample)
            tokens = train_data.token_counts(studies[:1], processor, views)[0]
            clock = StepClock()
            trainer = training.make_trainer(model, processor, config, stage, workdir / "trainer",
                                            train_data.build_dataset(studies, views),
                                            train_data.build_dataset(studies[:1], views), [clock])
            _free()
            trainer.train()
            assert len(clock.ends) == warmup + measured, clock.ends
            records.append({"visual_tokens": mode, "views_per_study": views, "load_in_4bit": True,
                            "precision": config["precision"], "stage": stage["name"], "batch_size": 1,
                            "grad_accum": 1, "image_tokens_per_study": tokens["image_tokens"],
                            "text_tokens_per_study_approx": tokens["text_tokens"], "warmup_steps": warmup,
                            "measured_steps": measured,
                            "seconds_per_step": (clock.ends[-1] - clock.ends[warmup - 1]) / measured,
                            "peak_memory_gib": peak_gpu_memory_gb()})
            print(records[-1])
            del trainer
        del model, processor
        _free()
    return records


def measure_generate(workdir: Path, sizes: dict, sample: list[Study]) -> list[dict]:
    """Studies/s, generated tokens/s and peak memory of notebook 03's batched generation, 4-bit and 16-bit."""
    run = build_llava(workdir, sizes, sample)
    records = []
    for load_in_4bit in (True, False):
        model, processor, config = load_for_inference(run, load_in_4bit=load_in_4bit)
        for batch_size in sizes["generate_batch_sizes"]:
            studies = synthetic_studies(workdir, batch_size, GENERATE_VIEWS, sample)
            views, ids = [study_images(s) for s in studies], [s.id for s in studies]
            generate_batch(model, processor, views, ids, max_new_tokens=sizes["max_new_tokens"])  # warm-up
            _free()
            start, tokens = time.perf_counter(), 0
            for _ in range(sizes["generate_rounds"]):
                tokens += sum(r["n_tokens"] for r in generate_batch(model, processor, views, ids,
                                                                    max_new_tokens=sizes["max_new_tokens"]))
            seconds = time.perf_counter() - start
            studies_done = batch_size * sizes["generate_rounds"]
            records.append({"load_in_4bit": load_in_4bit, "compute_dtype": str(default_dtype()).removeprefix("torch."),
                            "with_untrained_lora_adapter": True, "visual_tokens": config["visual_tokens"],
                            "batch_size": batch_size, "views_per_study": GENERATE_VIEWS,
                            "max_new_tokens": sizes["max_new_tokens"], "studies": studies_done, "seconds": seconds,
                            "studies_per_s": studies_done / seconds, "generated_tokens_per_s": tokens / seconds,
                            "generated_tokens_per_study": tokens / studies_done,
                            "peak_memory_gib": peak_gpu_memory_gb()})
            print(records[-1])
        del model, processor
        _free()
    return records


def judge_pairs(studies: list[Study], count: int) -> list[tuple[str, str]]:
    """The longest distinct (reference, candidate) pairs, formed as in notebook 04: one region's text in two studies."""
    by_region = [[s.regions[r] for s in studies if s.regions and s.regions[r]] for r in REGIONS]
    pairs = dict.fromkeys((ref, cand) for texts in by_region for ref, cand in zip(texts, texts[1:]) if ref != cand)
    return sorted(pairs, key=lambda pair: -len(pair[0]) - len(pair[1]))[:count]


def measure_judge(workdir: Path, sizes: dict, sample: list[Study]) -> list[dict]:
    """Our loop and the shipped GREEN class on one batch of the same pairs, both in GREEN's fp16 (our loop's own default
    is bf16 on Ampere+, as fast): same completions, hence the same number of generated tokens."""
    judge_dir, pairs = str(build_judge(workdir, sizes, sample)), judge_pairs(sample, sizes["judge_pairs"])
    model, tokenizer = judge.load_judge(judge_dir, dtype=torch.float16)
    prompts = [judge.chat_text(tokenizer, ref, cand) for ref, cand in pairs]
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    # GREEN generates up to 2,048 tokens in all, prompt included (tests/test_green.py gives our loop the same bound)
    common = {"dtype": "float16", "pairs": len(pairs), "batch_size": 8, "prompt_tokens_max": longest,
              "new_tokens_per_pair": judge.GREEN_MAX_LENGTH - longest}
    cache = workdir / "judge_cache.jsonl"
    cache.unlink(missing_ok=True)  # a cached pair would not be judged again
    ours = judge.Judge(judge_dir, cache, batch_size=8, max_new_tokens=common["new_tokens_per_pair"])
    ours.model, ours.tokenizer = model, tokenizer
    judge.generate_responses(model, tokenizer, prompts[:1], 2)  # warm-up
    start = time.perf_counter()
    judged = ours.judge(pairs)
    ours_seconds = time.perf_counter() - start
    del ours, model
    _free()
    shipped = GREEN(judge_dir, cpu=not torch.cuda.is_available(), compute_summary_stats=False)
    shipped.tokenizer.batch_encode_plus = shipped.tokenizer.__call__  # removed in transformers 5 (tests/test_green.py)
    judge.generate_responses(shipped.model, shipped.tokenizer, prompts[:1], 2)  # warm-up
    start = time.perf_counter()
    results = shipped([ref for ref, _ in pairs], [cand for _, cand in pairs])[-1]  # GREEN's batch size is 8 too
    green_seconds = time.perf_counter() - start
    # most new tokens of a pair: the batch's decoding steps (early EOS in one row does not end the batch)
    generated = max(r["n_new_tokens"] for r in judged)
    same = [r["response"] for r in judged] == list(results.green_analysis)
    records = [{"loop": loop, **common, "generated_tokens_max": generated, "same_responses": same, "seconds": seconds,
                "seconds_per_pair": seconds / len(pairs)}
               for loop, seconds in (("helpers.judge.Judge", ours_seconds), ("green_score.green.GREEN", green_seconds))]
    print(records)
    return records


def device_info() -> dict:
    from importlib.metadata import version

    name, memory, capability = gpu()
    return {"gpu": name, "capability": capability and list(capability), "total_memory_gib": memory,
            **{package: version(package) for package in ("torch", "transformers", "peft", "trl", "bitsandbytes")}}


def problems(result: dict) -> list[str]:
    """What is missing or not positive in the parts present."""
    found = []
    for part, fields in REQUIRED.items():
        if part not in result:
            continue
        if not result[part]:
            found.append(f"{part}: no records")
        for i, record in enumerate(result[part]):
            for field in fields:
                value = record.get(field)
                if value is None and field == "peak_memory_gib" and result["dry_run"]:
                    continue  # no GPU memory on the CPU, where only the code path is checked
                if value is None or type(value) in (int, float) and value <= 0:
                    found.append(f"{part}[{i}].{field} = {value!r}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, help="one part only (default: all)")
    parser.add_argument("--out", default="artifacts/gpu_check.json")
    parser.add_argument("--workdir", help="where models and images are built and reused, e.g. across --part runs "
                                          "(default: a tempdir; the 7B models take ~30 GB)")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny widths, then check keys")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device. It measures GPU memory and speed; use --dry-run to check it on the CPU.",
              file=sys.stderr)
        return 2
    sizes = TINY if args.dry_run else REAL
    sample = load_studies(REPO_ROOT / "data" / "sample")  # report texts: tokenizers, targets, judge pairs
    measure = {"train": measure_train, "generate": measure_generate, "judge": measure_judge}
    out = Path(args.out)
    result = {"device": device_info(), "dry_run": args.dry_run}
    if out.is_file():  # parts run one at a time add up, as long as the machine and mode are the same
        previous = json.loads(out.read_text(encoding="utf-8"))
        if {k: previous.get(k) for k in result} == result:
            result = previous
    workdir_context = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with workdir_context as workdir:
        for part in [args.part] if args.part else PARTS:
            print(f"== {part}", flush=True)
            result[part] = measure[part](Path(workdir) / sizes["name"], sizes, sample)
            atomic_write_json(out, result)
            _free()
    found = problems(result)
    print(f"wrote {out}" + "".join(f"\nPROBLEM {p}" for p in found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
