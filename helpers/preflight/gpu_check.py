"""`make gpu-check`: QLoRA training, generation and GREEN-judge cost at the real shapes, on random weights.

The model checked, the default 7B or `--model-id` (a folder, or a hub id whose config and processor are in the hub
cache: `hf download ID --exclude "*.safetensors"`; planned by `gpu_plan.model_checked`), and the judge are built
offline with random weights at the real shapes, saved to a work folder and loaded back through the project's own
loaders, so the measured path is the one users run; nothing is downloaded. Each measurement is appended to one
JSON (default artifacts/gpu_check.json) as it finishes; one that raises (out of GPU memory, say) is recorded with its
error and the run goes on to the next (exit status 1 at the end, naming it).

What cannot fit this GPU is skipped, and its record says why: each generation and judge measurement's memory is
estimated from the real shapes (`estimate_gib`: weights + KV cache, see `plan`) and measured only where the estimate
plus HEADROOM_GIB fits the GPU's total memory. Our judge loop runs as this GPU's settings run it
(`judge_precision`, `judge_4bit`, `judge_batch_size`: 4-bit on a T4), the shipped GREEN class as it always runs
(fp16, batch 8); on a machine with several GPUs the latter runs in a child process that sees one
(`shipped_green_env`). Training (QLoRA, batch 1, the T4 profile's setup) is measured everywhere. The judge-engines
part (`gpu_judge.measure_engine`): the same pairs through static batches, continuous batching and `transformers
serve`, one after the other (pairs and answer tokens/s, peak memory, share identical to static's).

`--quick`: all four parts, less of each (its --help); the judge parts whole, since their time is 2,048-token
decoding, which fewer pairs would not shorten. Designed to finish in under 8 minutes on one 80 GB GPU (a target).
`--dry-run` runs every part on the CPU (the 7B at tiny widths, another `--model-id` from its config as it is) and
checks the JSON's keys (exit status 1 if some are missing). Parts run one at a time (`--part`) add up in one JSON
when the machine, model and mode (dry run, quick) are the same.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is built locally: a hub lookup would be a bug

import torch  # noqa: E402  (after HF_HUB_OFFLINE, which huggingface_hub reads on import)
from transformers import AutoConfig, AutoModelForImageTextToText, TrainerCallback  # noqa: E402

from ..judge import judge
from ..train import examples, training  # noqa: E402
from ..core.data import Study, load_studies, study_images  # noqa: E402
from ..demo.tiny_models import build_random_llava, save_once, tokenizer_corpus  # noqa: E402
from ..model.generation import generate_batch  # noqa: E402
from .gpu_judge import (answer_lengths, build_judge, free_and_reset, judge_pairs, measure_engine,  # noqa: E402
                        prompt_fields, random_weights, shipped_green, shipped_green_env, shipped_green_in_child)
from .gpu_plan import GENERATE_VIEWS, PARTS, REAL, SHIPPED, TINY, model_checked, plan, problems, quick  # noqa: E402
from ..model.modeling import DEFAULT_MODEL_ID, auto_processor, checkpoint_family, load_for_inference  # noqa: E402
from ..core.runs import Artifacts, Run  # noqa: E402
from ..core.settings import GREEN_TOKEN_BUDGET, REPO_ROOT, default_dtype, gpu, peak_gpu_memory_gb, resolve  # noqa: E402
from ..core.storage import atomic_write_json  # noqa: E402

def build_llava(workdir: Path, sizes: dict, sample: list[Study], model_id: str = DEFAULT_MODEL_ID) -> Run:
    """A random model saved like a hub checkpoint, plus a run holding an untrained adapter (LoRA B = 0: outputs
    unchanged, but generation pays for the LoRA layers as users do) that notebook 03's loader reads like a trained
    one; an existing build is reused. The default 7B: LLaVA-NeXT at `sizes`' widths, the real image geometry, a small
    tokenizer trained on the sample's reports (text tokens per study approximate, image tokens exact); another
    `model_id`: its own config (the dry run's too) and processor.
    """
    run = Artifacts(workdir).run("gpu-check")
    if run.config_path.is_file():
        return run
    if model_id == DEFAULT_MODEL_ID:
        model_dir = build_random_llava(workdir / "llava", tokenizer_corpus(sample), image_size=336,
                                       widths=sizes["llava"], **random_weights())
    else:
        weights = random_weights()  # drawn as the 7B's
        build = lambda: (AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_id),
                                                                dtype=weights.get("dtype")),
                         auto_processor(model_id, checkpoint_family(model_id)))
        model_dir = save_once(workdir / "model", build, 0, weights.get("device", "cpu"))
    config = training.make_config(resolve("t4"), model_id=str(model_dir), max_length=None)
    model, processor = training.load_training_model(config)
    model.save_pretrained(run.adapter_dir)
    processor.save_pretrained(run.adapter_dir)
    atomic_write_json(run.config_path, config)  # last: its presence marks a complete build
    return run


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


@dataclass
class Failed:
    error: str


class Check:
    """The measurements of one run, which share the models they build and the one model loaded at a time."""

    def __init__(self, workdir: Path, sizes: dict, settings, sample: list[Study], model_id: str = DEFAULT_MODEL_ID):
        self.workdir, self.sizes, self.settings, self.sample, self.model_id = workdir, sizes, settings, sample, model_id
        self.built, self.loaded = {}, {}
        self.responses = None  # our judge loop's in fp16, compared with the shipped class's
        self.static_answers = {}  # the engines part's static answers, which the other engines are compared with

    def attempt(self, part: str, fields: dict, why: str | None) -> dict:
        """One measurement's record: measured, skipped (`why`), or failed with its error text (the run goes on)."""
        measure = {"train": self.measure_train, "generate": self.measure_generate, "judge": self.measure_judge,
                   "judge_engines": self.measure_judge_engine}[part]
        if why:
            record = {**fields, "skipped": True, "why": why}
        else:
            try:
                record = {**fields, **measure(fields)}
            except Exception as error:  # torch.OutOfMemoryError, say: recorded, and the next measurement runs
                traceback.print_exc()
                record = {**fields, "error": f"{type(error).__name__}: {error}"}
            free_and_reset()  # after the except block: its traceback held the failed measurement's tensors
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
        free_and_reset()

    def _llava_run(self) -> Run:
        return self._shared(self.built, "llava",
                            lambda: build_llava(self.workdir, self.sizes, self.sample, self.model_id))

    def measure_train(self, fields: dict) -> dict:
        """Seconds per optimizer step and peak memory of QLoRA with the project's trainer."""
        mode, views = fields["visual_tokens"], fields["views_per_study"]
        config, model, processor = self._load(("train", mode),
                                              lambda: _training_model(mode, self._llava_run().config["model_id"]))
        warmup, measured = self.sizes["warmup_steps"], self.sizes["measured_steps"]
        studies = synthetic_studies(self.workdir, warmup + measured, views, self.sample)
        tokens = examples.token_counts(studies[:1], processor, views)[0]
        clock = StepClock()
        trainer = training.make_trainer(model, processor, config, TRAIN_STAGE, self.workdir / "trainer",
                                        examples.build_dataset(studies, views, processor),
                                        examples.build_dataset(studies[:1], views, processor), [clock])
        free_and_reset()
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
        free_and_reset()
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
        prompts, measured = prompt_fields(ours.tokenizer, pairs)
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

    def measure_judge_engine(self, fields: dict) -> dict:
        """One engine on the engines part's pairs (the server on the first `server_pairs` of them), each answer given
        a length spread over GREEN's range (`answer_lengths`); `gpu_judge.measure_engine` measures."""
        judge_dir = self._shared(self.built, "judge", lambda: str(build_judge(self.workdir, self.sizes, self.sample)))
        pairs = judge_pairs(self.sample, self.sizes["engine_pairs"])
        lengths = answer_lengths(len(pairs), *self.sizes["answer_tokens"])
        if fields["engine"] == "server":
            pairs, lengths = pairs[:self.sizes["server_pairs"]], lengths[:self.sizes["server_pairs"]]
            self.release()
        key = ("judge", fields["dtype"], fields["load_in_4bit"])
        load = lambda: self._load(key, lambda: judge.load_judge(judge_dir, load_in_4bit=fields["load_in_4bit"],
                                                                dtype=getattr(torch, fields["dtype"])))
        return measure_engine(fields["engine"], fields, judge_dir, pairs, lengths, self.workdir, load,
                              self.static_answers)


def device_info() -> dict:
    from importlib.metadata import version

    name, memory, capability = gpu()
    return {"gpu": name, "gpu_count": torch.cuda.device_count(), "capability": capability and list(capability),
            "total_memory_gib": memory,
            **{package: version(package) for package in ("torch", "transformers", "peft", "trl", "bitsandbytes")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, help="one part only (default: all)")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID,
                        help="the model checked: a folder or a hub id in the local cache (config and processor "
                             "files; weights are random); the dry run builds it from its config as it is")
    parser.add_argument("--out", default="artifacts/gpu_check.json")
    parser.add_argument("--workdir", help="where models and images are built and reused, e.g. across --part runs "
                                          "(default: a tempdir; the 7B models take ~30 GB)")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny widths, then check keys")
    parser.add_argument("--quick", action="store_true",
                        help="all four parts, less of each: training in the default visual-token mode only, at 1 and "
                             "3 views, 1 warm-up + 2 measured steps; generation at the largest batch only, one round")
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
    result = {"device": device_info(), "model_id": args.model_id, "dry_run": args.dry_run, "quick": args.quick}
    if out.is_file():  # parts run one at a time add up, as long as the machine and mode are the same
        previous = json.loads(out.read_text(encoding="utf-8"))
        if {k: previous.get(k) for k in result} == result:
            result = previous
    model = model_checked(args.model_id, settings.visual_tokens)
    planned = plan(sizes, settings, None if args.dry_run else settings.gpu_memory_gb, model)
    workdir_context = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with workdir_context as workdir:
        name = sizes["name"] if args.model_id == DEFAULT_MODEL_ID else args.model_id.rstrip("/").split("/")[-1]
        check = Check(Path(workdir) / name, sizes, settings, sample, args.model_id)
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
