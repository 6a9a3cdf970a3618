"""`make gpu-check`: QLoRA training, generation and GREEN-judge cost at the real 7B shapes, on random weights.

Models are built offline from configs with the real architectures' shapes, saved to a work folder and loaded back
through the project's own loaders, so the measured path is the one users run; nothing is downloaded. Each
measurement is appended to one JSON (default artifacts/gpu_check.json) as it finishes; one that raises (out of GPU
memory, say) is recorded with its error and the run goes on to the next (exit status 1 at the end, naming it).

What cannot fit this GPU is skipped, and its record says why: each generation and judge measurement's memory is
estimated from the real shapes (`estimate_gib`: weights + KV cache, see `plan`) and measured only where the estimate
plus HEADROOM_GIB fits the GPU's total memory. Our judge loop runs as this GPU's settings run it
(`judge_precision`, `judge_4bit`, `judge_batch_size`: 4-bit on a T4), the shipped GREEN class as it always runs
(fp16, batch 8); on a machine with several GPUs the latter runs in a child process that sees one
(`shipped_green_env`). Training (QLoRA, batch 1, the T4 profile's setup) is measured everywhere.

`--quick`: all three parts, less of each: training in the default visual-token mode only ("base", not also "tile"),
at 1 and 3 views per study (not also 2), with 1 warm-up and 2 measured steps (not 3 and 5); generation at the largest
batch (8) only, one round (not 2); the judge part whole, since its time is 2,048-token decoding, which fewer pairs
would not shorten. Designed to finish in under 8 minutes on one 80 GB A100, H100 or H200 (a design target).
`--dry-run` runs every part on the CPU at tiny widths and checks the JSON's keys (exit status 1 if some are missing).
Parts run one at a time (`--part`) add up in one JSON when the machine and mode (dry run, quick) are the same.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is built locally: a hub lookup would be a bug

import torch  # noqa: E402  (after HF_HUB_OFFLINE, which huggingface_hub reads on import)
from green_score.green import GREEN  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from . import judge, train_data, training  # noqa: E402
from .data import REGIONS, Study, load_studies, study_images  # noqa: E402
from .demo_models import TINY_LLAVA, build_random_judge, build_random_llava, tokenizer_corpus  # noqa: E402
from .generation import generate_batch  # noqa: E402
from .modeling import load_for_inference, visual_tokens_per_view  # noqa: E402
from .runs import Artifacts, Run  # noqa: E402
from .settings import (GREEN_TOKEN_BUDGET, REPO_ROOT, default_dtype, gpu, peak_gpu_memory_gb, resolve,  # noqa: E402
                       torch_dtype)
from .storage import atomic_write_json, free_gpu_memory  # noqa: E402

PARTS = ("train", "generate", "judge")
OURS, SHIPPED = "helpers.judge.Judge", "green_score.green.GREEN"
GREEN_BATCH_SIZE = 8  # GREEN.__init__ fixes it
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
        "judge_tokenizer_vocab": 4000, "name": "7b", "visual_token_modes": ("tile", "base"), "train_views": (1, 2, 3),
        "warmup_steps": 3, "measured_steps": 5, "generate_batch_sizes": (1, 8), "generate_rounds": 2,
        "max_new_tokens": 64, "judge_pairs": 8}
# Tiny widths with the real image geometry; multiples of 64, so bitsandbytes' 4-bit layers also run on the CPU.
TINY = {"llava": TINY_LLAVA,
        "judge": None,  # build_random_judge's own tiny Llama
        "judge_tokenizer_vocab": 340,  # long prompts: GREEN's 2,048-token budget leaves ~120 tokens to generate
        "name": "tiny", "visual_token_modes": ("tile", "base"), "train_views": (1, 2, 3), "warmup_steps": 1,
        "measured_steps": 1, "generate_batch_sizes": (1, 2), "generate_rounds": 1, "max_new_tokens": 8,
        "judge_pairs": 2}
REQUIRED = {"train": ("visual_tokens", "views_per_study", "image_tokens_per_study", "seconds_per_step",
                      "peak_memory_gib"),
            "generate": ("load_in_4bit", "batch_size", "studies_per_s", "generated_tokens_per_s", "peak_memory_gib"),
            "judge": ("loop", "pairs", "new_tokens_per_pair", "generated_tokens_max", "seconds_per_pair",
                      "peak_memory_gib")}
# Memory estimates (`plan`). nf4 with double quantization stores 4 bits per weight, an 8-bit absmax per 64 weights
# and an fp32 constant per 256 absmax: 4.127 bits.
NF4_BYTES = 4.127 / 8
# Beside weights and KV cache: the CUDA context (~0.5 GiB), prefill activations, the cache's copy as it grows by one
# token, the allocator's fragmentation
HEADROOM_GIB = 2
PROMPT_TEXT_TOKENS = 128  # instruction and chat template around a study's image tokens (~60 with Mistral's tokenizer)


def quick(sizes: dict, settings) -> dict:
    """`sizes` for --quick (module docstring): the same measurements, fewer configurations and steps."""
    return {**sizes, "visual_token_modes": (settings.visual_tokens,), "train_views": (1, 3), "warmup_steps": 1,
            "measured_steps": min(2, sizes["measured_steps"]),
            "generate_batch_sizes": sizes["generate_batch_sizes"][-1:], "generate_rounds": 1}


def decoder_weights(shapes: dict) -> tuple[int, int]:
    """(weights of the decoder layers' linear projections, other weights) of a Llama or Mistral config: per layer q
    and o hidden² each, k and v hidden·kv_heads·head_dim each, gate, up and down hidden·intermediate each; the
    embeddings and the untied lm_head vocab·hidden each. Norms (under 0.01%) are left out."""
    hidden, head_dim = shapes["hidden_size"], shapes["hidden_size"] // shapes["num_attention_heads"]
    layer = (2 * hidden * hidden + 2 * hidden * shapes["num_key_value_heads"] * head_dim
             + 3 * hidden * shapes["intermediate_size"])
    return shapes["num_hidden_layers"] * layer, 2 * shapes["vocab_size"] * hidden


def weights_gib(model: str, load_in_4bit: bool) -> float:
    """REAL's "llava" or "judge" in 16 bits, or in 4 bits as lm.bnb_4bit_config quantizes it: nf4 for the decoder
    layers' projections only; embeddings, lm_head, LLaVA's vision tower (per CLIP layer 4·hidden² +
    2·hidden·intermediate) and projector (vision·text + text² hidden) stay 16-bit. Biases are left out."""
    text = REAL["llava"]["text"] if model == "llava" else REAL["judge"]
    quantized, other = decoder_weights(text)
    if model == "llava":
        vision = REAL["llava"]["vision"]
        width = vision["hidden_size"]
        other += (vision["num_hidden_layers"] * (4 * width ** 2 + 2 * width * vision["intermediate_size"])
                  + width * text["hidden_size"] + text["hidden_size"] ** 2)
    return (quantized * (NF4_BYTES if load_in_4bit else 2) + other * 2) / 2**30


def kv_cache_gib(shapes: dict, batch_size: int, tokens: int) -> float:
    """16-bit keys and values of every layer for `tokens` per row: 2 · layers · kv_heads · head_dim · 2 bytes ·
    batch · tokens (128 KiB a token for Mistral-7B's 8 KV heads, 512 KiB for Llama-2-7B's 32)."""
    head_dim = shapes["hidden_size"] // shapes["num_attention_heads"]
    return 2 * shapes["num_hidden_layers"] * shapes["num_key_value_heads"] * head_dim * 2 * batch_size * tokens / 2**30


def plan(sizes: dict, settings, memory_gib: float | None) -> dict[str, list[tuple[dict, str | None]]]:
    """Each part's measurements in order: (the fields that name it in the JSON, why it is skipped or None), for
    `settings` and a GPU of `memory_gib` total memory.

    Generation and judge measurements carry `estimate_gib` = weights_gib + kv_cache_gib at the REAL shapes, for the
    batch and the tokens a row ends with (generation: a study's image tokens + PROMPT_TEXT_TOKENS + max_new_tokens;
    the judge: GREEN's 2,048-token total); skipped where estimate_gib + HEADROOM_GIB exceeds `memory_gib`.
    `memory_gib` None (the dry run's tiny models): nothing estimated or skipped.
    """
    def estimated(fields: dict, model: str, batch_size: int, tokens: int) -> tuple[dict, str | None]:
        if memory_gib is None:
            return {**fields, "estimate_gib": None}, None
        shapes = REAL["llava"]["text"] if model == "llava" else REAL["judge"]
        weights, cache = weights_gib(model, fields["load_in_4bit"]), kv_cache_gib(shapes, batch_size, tokens)
        record = {**fields, "estimate_gib": round(weights + cache, 2)}
        if record["estimate_gib"] + HEADROOM_GIB <= memory_gib:
            return record, None
        return record, (f"needs ~{weights + cache:.1f} GiB ({weights:.1f} of weights + {cache:.1f} of KV cache) + "
                        f"{HEADROOM_GIB} GiB headroom, more than this GPU's {memory_gib} GiB")

    study_tokens = (GENERATE_VIEWS * visual_tokens_per_view(512, 512, settings.visual_tokens) + PROMPT_TEXT_TOKENS
                    + sizes["max_new_tokens"])
    ours_batch, green_batch = (min(b, sizes["judge_pairs"]) for b in (settings.judge_batch_size, GREEN_BATCH_SIZE))
    precision = str(torch_dtype(settings.judge_precision)).removeprefix("torch.")
    return {"train": [({"visual_tokens": mode, "views_per_study": views}, None)
                      for mode in sizes["visual_token_modes"] for views in sizes["train_views"]],
            "generate": [estimated({"load_in_4bit": load_in_4bit, "batch_size": batch_size}, "llava", batch_size,
                                   study_tokens)
                         for load_in_4bit in (True, False) for batch_size in sizes["generate_batch_sizes"]],
            "judge": [estimated({"loop": OURS, "dtype": precision, "load_in_4bit": settings.judge_4bit,
                                 "batch_size": ours_batch}, "judge", ours_batch, GREEN_TOKEN_BUDGET),
                      estimated({"loop": SHIPPED, "dtype": "float16", "load_in_4bit": False,
                                 "batch_size": green_batch}, "judge", green_batch, GREEN_TOKEN_BUDGET)]}


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
    """The demo's tiny judge widths (the dry run's judge) or a Llama-2-7B-shaped one with a tokenizer of its kind, with
    random weights: it never stops, so every answer runs to GREEN's budget."""
    widths = {} if sizes["judge"] is None else {"widths": sizes["judge"], **_random_weights()}
    return build_random_judge(workdir / f"judge-{sizes['name']}", tokenizer_corpus(sample),
                              vocab_size=sizes["judge_tokenizer_vocab"], format_steps=0, **widths)


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


# the default preset's second stage trains vision LoRA too: the heavier of its two stages
TRAIN_STAGE = {**training.resolve_stages("two_stage", 2)[-1], "epochs": 1}


def _training_model(mode: str, model_dir: str):
    """QLoRA with the t4 profile's precision rule, batch 1, no accumulation, no eval or checkpoint: (config, model,
    processor), the model set up for TRAIN_STAGE."""
    config = training.make_config(resolve("t4"), model_id=model_dir, max_length=None, load_in_4bit=True,
                                  stages=[TRAIN_STAGE], visual_tokens=mode, batch_size=1, grad_accum=1,
                                  save_steps=10**6, logging_steps=10**6)
    model, processor = training.load_training_model(config)
    training.set_trainable(model, TRAIN_STAGE)
    return config, model, processor


def judge_pairs(studies: list[Study], count: int) -> list[tuple[str, str]]:
    """The longest distinct (reference, candidate) pairs, formed as in notebook 04: one region's text in two studies."""
    by_region = [[s.regions[r] for s in studies if s.regions and s.regions[r]] for r in REGIONS]
    pairs = dict.fromkeys((ref, cand) for texts in by_region for ref, cand in zip(texts, texts[1:]) if ref != cand)
    return sorted(pairs, key=lambda pair: -len(pair[0]) - len(pair[1]))[:count]


def _prompts(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[str], dict]:
    """GREEN's chat prompts for `pairs` and their record fields: GREEN generates up to 2,048 tokens in all, prompt
    included (tests/test_green.py gives our loop the same bound), so the longest prompt sets the new tokens."""
    prompts = [judge.chat_text(tokenizer, ref, cand) for ref, cand in pairs]
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    return prompts, {"pairs": len(pairs), "prompt_tokens_max": longest,
                     "new_tokens_per_pair": GREEN_TOKEN_BUDGET - longest}


def shipped_green(judge_dir: str, pairs: list[tuple[str, str]]) -> dict:
    """The shipped GREEN class on one batch of `pairs`: its record fields, and its responses under "responses"."""
    _free()
    shipped = GREEN(judge_dir, cpu=not torch.cuda.is_available(), compute_summary_stats=False)
    shipped.tokenizer.batch_encode_plus = shipped.tokenizer.__call__  # removed in transformers 5 (tests/test_green.py)
    prompts, fields = _prompts(shipped.tokenizer, pairs)
    judge.generate_responses(shipped.model, shipped.tokenizer, prompts[:1], 2)  # warm-up
    generate, new_tokens = shipped.model.generate, []

    def counted(**kwargs):  # GREEN reports no token counts: its batch's decoding steps, read off its own call
        sequences = generate(**kwargs)
        new_tokens.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return sequences

    shipped.model.generate = counted
    start = time.perf_counter()
    results = shipped([ref for ref, _ in pairs], [cand for _, cand in pairs])[-1]
    seconds = time.perf_counter() - start
    return {**fields, "generated_tokens_max": max(new_tokens), "seconds": seconds,
            "seconds_per_pair": seconds / len(pairs), "peak_memory_gib": peak_gpu_memory_gb(),
            "responses": list(results.green_analysis)}


def shipped_green_env(device_count: int, environ: dict) -> dict | None:
    """The environment of a child process for the shipped GREEN class, or None where it runs in this process.

    With more than one GPU visible GREEN.__init__ calls init_process_group("nccl"), which fails without torchrun's
    RANK and WORLD_SIZE. CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises, and this process has (measuring
    the parts before), so only a new process can be shown a single GPU: the first one this process sees, where it
    measured the rest. With one GPU the class runs here, leaving that GPU to one CUDA context."""
    if device_count < 2:
        return None
    first = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return {**environ, "CUDA_VISIBLE_DEVICES": first or "0"}


def shipped_green_in_child(env: dict, judge_dir: str, pairs: list[tuple[str, str]]) -> dict:
    """`shipped_green` in a child process with environment `env`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shipped.json"
        code = ("import json, sys; from helpers.gpu_check import shipped_green; "
                "open(sys.argv[2], 'w').write(json.dumps(shipped_green(*json.loads(sys.argv[1]))))")
        child = subprocess.run([sys.executable, "-c", code, json.dumps([judge_dir, pairs]), str(out)], cwd=REPO_ROOT,
                               env=env, stderr=subprocess.PIPE, text=True)
        if child.returncode:
            raise RuntimeError(f"the child process exited with {child.returncode}:\n{child.stderr[-3000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


@dataclass
class Failed:
    error: str


class Check:
    """The measurements of one run, which share the models they build and the one model loaded at a time."""

    def __init__(self, workdir: Path, sizes: dict, settings, sample: list[Study]):
        self.workdir, self.sizes, self.settings, self.sample = workdir, sizes, settings, sample
        self.built, self.loaded = {}, {}
        self.responses = None  # our judge loop's in fp16, compared with the shipped class's

    def attempt(self, part: str, fields: dict, why: str | None) -> dict:
        """One measurement's record: measured, skipped (`why`), or failed with its error text (the run goes on)."""
        measure = {"train": self.measure_train, "generate": self.measure_generate, "judge": self.measure_judge}[part]
        if why:
            record = {**fields, "skipped": True, "why": why}
        else:
            try:
                record = {**fields, **measure(fields)}
            except Exception as error:  # torch.OutOfMemoryError, say: recorded, and the next measurement runs
                traceback.print_exc()
                record = {**fields, "error": f"{type(error).__name__}: {error}"}
            _free()  # after the except block: its traceback held the failed measurement's tensors
        print(record, flush=True)
        return record

    def _shared(self, store: dict, key, make):
        """store[key], made on first use. A failure is kept as its text, so the measurements needing it fail with it
        instead of retrying it (and no kept traceback holds GPU memory)."""
        if key not in store:
            try:
                store[key] = make()
            except Exception as error:
                store[key] = Failed(f"{key}: {type(error).__name__}: {error}")
        if isinstance(store[key], Failed):
            raise RuntimeError(f"failed earlier: {store[key].error}")
        return store[key]

    def _load(self, key, make):
        """The one model loaded at a time: another key frees the one before first."""
        if key not in self.loaded:
            self.release()
        return self._shared(self.loaded, key, make)

    def release(self):
        self.loaded.clear()
        _free()

    def _llava_run(self) -> Run:
        return self._shared(self.built, "llava", lambda: build_llava(self.workdir, self.sizes, self.sample))

    def measure_train(self, fields: dict) -> dict:
        """Seconds per optimizer step and peak memory of QLoRA with the project's trainer."""
        mode, views = fields["visual_tokens"], fields["views_per_study"]
        config, model, processor = self._load(("train", mode),
                                              lambda: _training_model(mode, self._llava_run().config["model_id"]))
        warmup, measured = self.sizes["warmup_steps"], self.sizes["measured_steps"]
        studies = synthetic_studies(self.workdir, warmup + measured, views, self.sample)
        tokens = train_data.token_counts(studies[:1], processor, views)[0]
        clock = StepClock()
        trainer = training.make_trainer(model, processor, config, TRAIN_STAGE, self.workdir / "trainer",
                                        train_data.build_dataset(studies, views),
                                        train_data.build_dataset(studies[:1], views), [clock])
        _free()
        trainer.train()
        assert len(clock.ends) == warmup + measured, clock.ends
        return {"load_in_4bit": True, "precision": config["precision"], "stage": TRAIN_STAGE["name"], "batch_size": 1,
                "grad_accum": 1, "image_tokens_per_study": tokens["image_tokens"],
                "text_tokens_per_study_approx": tokens["text_tokens"], "warmup_steps": warmup,
                "measured_steps": measured, "seconds_per_step": (clock.ends[-1] - clock.ends[warmup - 1]) / measured,
                "peak_memory_gib": peak_gpu_memory_gb()}

    def measure_generate(self, fields: dict) -> dict:
        """Studies/s, generated tokens/s and peak memory of notebook 03's batched generation."""
        load_in_4bit, batch_size = fields["load_in_4bit"], fields["batch_size"]
        max_new_tokens = self.sizes["max_new_tokens"]
        model, processor, config = self._load(("generate", load_in_4bit),
                                              lambda: load_for_inference(self._llava_run(), load_in_4bit=load_in_4bit))
        studies = synthetic_studies(self.workdir, batch_size, GENERATE_VIEWS, self.sample)
        views, ids = [study_images(s) for s in studies], [s.id for s in studies]
        generate_batch(model, processor, views, ids, max_new_tokens=max_new_tokens)  # warm-up
        _free()
        start, tokens = time.perf_counter(), 0
        for _ in range(self.sizes["generate_rounds"]):
            tokens += sum(r["n_tokens"] for r in generate_batch(model, processor, views, ids,
                                                                max_new_tokens=max_new_tokens))
        seconds = time.perf_counter() - start
        studies_done = batch_size * self.sizes["generate_rounds"]
        return {"compute_dtype": str(default_dtype()).removeprefix("torch."), "with_untrained_lora_adapter": True,
                "visual_tokens": config["visual_tokens"], "views_per_study": GENERATE_VIEWS,
                "max_new_tokens": max_new_tokens, "studies": studies_done, "seconds": seconds,
                "studies_per_s": studies_done / seconds, "generated_tokens_per_s": tokens / seconds,
                "generated_tokens_per_study": tokens / studies_done, "peak_memory_gib": peak_gpu_memory_gb()}

    def measure_judge(self, fields: dict) -> dict:
        """One loop on the same pairs: ours as the settings run it, or the shipped class. Both generate to GREEN's
        2,048-token total (settings.judge_max_new_tokens on every GPU); `same_responses` on the shipped class's
        record compares its responses with ours (None where ours ran in another precision, or not at all)."""
        judge_dir = self._shared(self.built, "judge", lambda: str(build_judge(self.workdir, self.sizes, self.sample)))
        pairs = judge_pairs(self.sample, self.sizes["judge_pairs"])
        if fields["loop"] == SHIPPED:
            env = shipped_green_env(torch.cuda.device_count(), dict(os.environ))
            measured = shipped_green(judge_dir, pairs) if env is None else shipped_green_in_child(env, judge_dir, pairs)
            responses = measured.pop("responses")
            return {**measured, "same_responses": None if self.responses is None else responses == self.responses}
        cache = self.workdir / "judge_cache.jsonl"
        cache.unlink(missing_ok=True)  # a cached pair would not be judged again
        ours = judge.Judge(judge_dir, cache, load_in_4bit=fields["load_in_4bit"], dtype=getattr(torch, fields["dtype"]),
                           batch_size=fields["batch_size"], max_new_tokens=GREEN_TOKEN_BUDGET)
        ours.model, ours.tokenizer = judge.load_judge(judge_dir, load_in_4bit=ours.load_in_4bit, dtype=ours.dtype)
        prompts, measured = _prompts(ours.tokenizer, pairs)
        judge.generate_responses(ours.model, ours.tokenizer, prompts[:1], 2)  # warm-up
        start = time.perf_counter()
        judged = ours.judge(pairs)
        seconds = time.perf_counter() - start
        # other precisions answer differently: compared with the shipped class's only where ours ran in its fp16
        comparable = (fields["dtype"], fields["load_in_4bit"]) == ("float16", False)
        self.responses = [r["response"] for r in judged] if comparable else None
        # most new tokens of a pair: the batch's decoding steps (early EOS in one row does not end the batch)
        return {**measured, "generated_tokens_max": max(r["n_new_tokens"] for r in judged),
                "batch_size_fitted": ours.batch_size, "seconds": seconds, "seconds_per_pair": seconds / len(pairs),
                "peak_memory_gib": peak_gpu_memory_gb()}


def device_info() -> dict:
    from importlib.metadata import version

    name, memory, capability = gpu()
    return {"gpu": name, "gpu_count": torch.cuda.device_count(), "capability": capability and list(capability),
            "total_memory_gib": memory,
            **{package: version(package) for package in ("torch", "transformers", "peft", "trl", "bitsandbytes")}}


def problems(result: dict) -> list[str]:
    """The measurements that failed, and what is missing or not positive in those measured (skipped ones have none)."""
    found = []
    for part, fields in REQUIRED.items():
        if part not in result:
            continue
        if not result[part]:
            found.append(f"{part}: no records")
        for i, record in enumerate(result[part]):
            if record.get("skipped"):
                continue
            if "error" in record:
                found.append(f"{part}[{i}] failed: {record['error'].splitlines()[0]}")
                continue
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
    parser.add_argument("--quick", action="store_true",
                        help="all three parts, less of each: training in the default visual-token mode only, at 1 and "
                             "3 views, 1 warm-up + 2 measured steps; generation at the largest batch only, one round; "
                             "the judge part whole. Designed to take under 8 minutes on one 80 GB A100, H100 or H200")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device. It measures GPU memory and speed; use --dry-run to check it on the CPU.",
              file=sys.stderr)
        return 2
    settings = resolve()  # this GPU's: the judge runs as they say, and the fit rules read its memory
    sizes = TINY if args.dry_run else REAL
    sizes = quick(sizes, settings) if args.quick else sizes
    sample = load_studies(REPO_ROOT / "data" / "sample")  # report texts: tokenizers, targets, judge pairs
    out = Path(args.out)
    result = {"device": device_info(), "dry_run": args.dry_run, "quick": args.quick}
    if out.is_file():  # parts run one at a time add up, as long as the machine and mode are the same
        previous = json.loads(out.read_text(encoding="utf-8"))
        if {k: previous.get(k) for k in result} == result:
            result = previous
    planned = plan(sizes, settings, None if args.dry_run else settings.gpu_memory_gb)
    workdir_context = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with workdir_context as workdir:
        check = Check(Path(workdir) / sizes["name"], sizes, settings, sample)
        for part in [args.part] if args.part else PARTS:
            print(f"== {part}", flush=True)
            result[part] = []
            for fields, why in planned[part]:
                result[part].append(check.attempt(part, fields, why))
                atomic_write_json(out, result)  # after each measurement: a later failure or kill keeps it
            check.release()
    found = problems(result)
    print(f"wrote {out}" + "".join(f"\nPROBLEM {p}" for p in found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
