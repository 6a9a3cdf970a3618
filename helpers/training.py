"""Notebook 02: LoRA/QLoRA fine-tuning of LLaVA-NeXT with TRL, in stages, resumable; the run's settings are saved
for notebooks 03 and 04 (layout: helpers/runs.py).

The method in one place: `PRESETS` (what trains in each stage), `lora_config` (targets, rank), `sft_config` (learning
rate, precision, batch, schedule, model selection) and `method_table` (all of it, read back from those objects).
"""
from __future__ import annotations

import json
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .data import study_images
from . import preference
from .generation import default_max_new_tokens, generate_batch, sample_batch
from .metrics import nlg_metrics
from .modeling import load_model_and_processor, model_config as mode_config, training_chat_template, vision_layers_used
from .reports import INSTRUCTION, whole_report
from .settings import get_secret, peak_gpu_memory_gb, processes, torch_dtype
from .storage import atomic_write_json, free_gpu_memory, open_store, run_sharded, sha256
from .train_data import build_dataset, preference_dataset

# trl 1.16's DPOTrainer calls transformers' deprecated checkpointing names each step: nothing a user can change
warnings.filterwarnings("ignore", r"`(is_gradient_checkpointing|gradient_checkpointing_(en|dis)able)` is deprecated",
                        FutureWarning)
WARN_ABOVE = 0.8  # of the GPU's memory: what the estimate leaves out (CUDA context, allocator slack) is not small
HOLDOUT_NLG_STUDIES = 32  # held-out studies generated after each stage for `holdout_nlg`: a cheap check, not a test
# PEFT full-matches these against module paths such as "model.language_model.layers.0.self_attn.q_proj".
LLM_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = "multi_modal_projector"


def vision_targets(layers: int) -> str:
    """LoRA targets in the first `layers` layers of the vision tower: those whose output the image features read.

    LLaVA takes the features from `vision_feature_layer` (-2: the input of the last layer), so LoRA on a later layer
    would get no gradient, and DDP stops when a trainable parameter gets none.
    """
    indices = "|".join(map(str, range(layers)))
    return rf"model\.vision_tower\..*\.layers\.({indices})\..*\.(q_proj|k_proj|v_proj|out_proj)"


def _stage(name, epochs, lr, vision_lora, projector, llm_lora, **kind):
    return {"name": name, "epochs": epochs, "lr": lr, "vision_lora": vision_lora, "projector": projector,
            "llm_lora": llm_lora, **kind}


# Each stage gets a new trainer, hence a fresh optimizer and scheduler. epochs=None: what the other SFT stages leave
# of EPOCHS. The preference stage (dpo=True) trains stage 2's parts for its own epoch, outside EPOCHS, at a DPO
# learning rate for LoRA (TRL's 1e-6 default is for full fine-tuning).
_TWO_STAGE = [_stage("frozen_vision", 1, 2e-4, False, True, True), _stage("vision_lora", None, 1e-4, True, True, True)]
PRESETS = {
    "two_stage": _TWO_STAGE,
    "two_stage_dpo": [*_TWO_STAGE, _stage("preference", 1, 5e-6, True, True, True, dpo=True)],
    "qlora": [_stage("llm_lora", None, 2e-4, False, True, True)],
    "r2gengpt_shallow": [_stage("projector", None, 1e-4, False, True, False)],
    "r2gengpt_delta": [_stage("projector_vision_lora", None, 1e-4, True, True, False)],
}


def resolve_stages(preset: str, epochs: int, lr_scale: float = 1) -> list[dict]:
    if preset not in PRESETS:
        raise ValueError(f"unknown PRESET {preset!r}; choose one of {sorted(PRESETS)}")
    stages = [{**s, "lr": s["lr"] * lr_scale} for s in PRESETS[preset]]
    rest = epochs - sum(s["epochs"] for s in stages if s["epochs"] is not None and not s.get("dpo"))
    for stage in stages:
        if stage["epochs"] is None:
            stage["epochs"] = rest
    if any(s["epochs"] < 1 for s in stages):
        raise ValueError(f"preset {preset!r} needs more than {epochs} epoch(s): stages {stages}")
    return stages


def preference_inputs(settings, artifacts, preset: str, *, candidates: int, studies: int | None, beta: float,
                      judge_model_id: str | None = None, judge_engine: str | None = None,
                      judge_url: str | None = None) -> tuple:
    """(config.json's "preference", the GREEN judge) for a preset with a preference stage, else (None, None); the
    judge (notebook 04's, its cache and precision; demo: the tiny one) loads only when a pair is not cached."""
    if not any(stage.get("dpo") for stage in PRESETS.get(preset, ())):
        return None, None
    judge = preference.make_judge(settings, artifacts, judge_model_id, judge_engine, judge_url)
    return preference.preference_settings(candidates=candidates, studies=studies, beta=beta, judge=judge.label), judge


def default_run_name(model_id: str, preset: str) -> str:
    """RUN_NAME None: "<model>-<preset>", e.g. "llava-v1.6-mistral-7b-hf-two_stage"."""
    return f"{str(model_id).rstrip('/').split('/')[-1]}-{preset}"


def make_config(settings, *, model_id: str, max_length: int, preset: str = "two_stage", epochs: int | None = None,
                max_views: int = 3, visual_tokens: str | None = None, load_in_4bit: bool | None = None,
                lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, stages: list[dict] | None = None,
                preference: dict | None = None, seed: int = 0, **extra) -> dict:
    """Every setting of a run, JSON-ready: written to config.json and read back by notebooks 03 and 04.

    `settings` (helpers.setup) gives the profile's values; None arguments take them. Under `torchrun` / `accelerate
    launch` the gradient accumulation is divided among the processes. `stages` replaces the preset's
    stages (same keys as PRESETS); `preference` (`preference.preference_settings`) is required by a preset with a
    preference stage; `extra` adds settings (e.g. token stats) or overrides the profile's (save_steps).
    """
    epochs = epochs or settings.epochs
    stages = stages or resolve_stages(preset, epochs, settings.lr_scale)
    if any(s.get("dpo") for s in stages) != (preference is not None):
        raise ValueError(f"preset {preset!r}: preference settings (preference.preference_settings) go with a "
                         f"preference stage, and only with one")
    n_processes = processes().num_processes
    model_config = AutoConfig.from_pretrained(model_id, token=get_secret("HF_TOKEN"))
    config = {"model_id": str(model_id), "profile": settings.profile, "preset": preset,
              "precision": settings.precision,
              "load_in_4bit": settings.load_in_4bit if load_in_4bit is None else load_in_4bit,
              "visual_tokens": visual_tokens or settings.visual_tokens, "batch_size": settings.batch_size,
              "generate_batch_size": settings.generate_batch_size,  # the held-out check's (halved on out-of-memory)
              # N processes accumulate 1/N as many steps, so the effective batch (and the presets' learning rates)
              # stay the profile's; a run resumes only with the same number of processes
              "grad_accum": max(1, round(settings.grad_accum / n_processes)), "processes": n_processes,
              "epochs": epochs, "save_steps": settings.save_steps,
              "save_total_limit": 2, "logging_steps": settings.logging_steps,
              "stages": stages, "max_views": max_views,
              "max_length": max_length, "instruction": INSTRUCTION,
              "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout},
              "vision_lora_layers": vision_layers_used(model_config), "seed": seed,
              **({"preference": preference} if preference else {}), **extra}
    config = json.loads(json.dumps(config))  # tuples to lists, so a reloaded config compares equal
    check_memory(config, model_config, settings.gpu_memory_gb)
    return config


def memory_estimate_gib(config: dict, model_config) -> dict:
    """A computed estimate, by part, of one training step's peak GPU memory (GiB) for the longest study (`max_length`
    tokens) at the run's batch size; never measured (make gpu-check measures). The model is built on the meta device
    to count its parameters. Activation checkpointing keeps each layer's input (2 bytes per value); one layer is
    recomputed at a time; the logits and their gradient are fp32; the image tokens also pass the vision tower. A
    preference stage's batch is its pairs' chosen and rejected sequences (its reference pass keeps no activations).
    """
    base = mode_config(model_config, config["visual_tokens"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(base)
    text, vision = base.text_config, base.vision_config
    linears = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = sum(n for name, n in linears.items() if ".language_model." in name) if config["load_in_4bit"] else 0
    everything = sum(p.numel() for p in model.parameters())
    targets = lora_config(config).target_modules
    lora = sum(config["lora"]["r"] * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, name))
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    preference = any(s.get("dpo") for s in config["stages"])
    sequences = max(config["batch_size"], 2 * dpo_batch(config)[0] if preference else 0)
    tokens = sequences * (config.get("max_length") or 0)  # a DPO batch holds each pair's chosen and rejected
    gib = 2 ** 30
    return {
        # nf4 is half a byte per weight plus ~3% of block constants; prepare_model_for_kbit_training upcasts the
        # rest (embeddings, lm_head, vision tower, projector) to fp32
        "weights": (quantized * 0.53 + (everything - quantized) * (4 if config["load_in_4bit"] else 2)) / gib,
        "trainable_and_adam": (lora + projector) * 16 / gib,  # fp32 weight, gradient and two moments
        "activations": tokens * (text.num_hidden_layers * text.hidden_size * 2  # checkpointed layer inputs
                                 + (10 * text.hidden_size + 3 * text.intermediate_size) * 2  # one layer recomputed
                                 + text.vocab_size * 8  # fp32 logits and their gradient
                                 + vision.num_hidden_layers * vision.hidden_size * 2) / gib,
    }


def check_memory(config: dict, model_config, gpu_memory_gb: float | None) -> None:
    """Refuse a run whose computed peak (`memory_estimate_gib`) exceeds the GPU's memory, warn above WARN_ABOVE of
    it, before any weight loads; no GPU, no check."""
    if gpu_memory_gb is None or not config.get("max_length"):
        return
    parts = memory_estimate_gib(config, model_config)
    total = sum(parts.values())
    figures = (f"computed training peak ~{total:.1f} GiB ({', '.join(f'{k} {v:.1f}' for k, v in parts.items())}) "
               f"for max_length {config['max_length']} x batch {config['batch_size']}, visual tokens "
               f"{config['visual_tokens']!r}, 4-bit {config['load_in_4bit']}, on a {gpu_memory_gb} GiB GPU")
    if total > gpu_memory_gb:
        raise ValueError(f"{figures}: it cannot fit. Use VISUAL_TOKENS 'base', fewer MAX_VIEWS, LOAD_IN_4BIT True, "
                         f"or a larger GPU")
    if total > WARN_ABOVE * gpu_memory_gb:
        warnings.warn(f"{figures}: above {WARN_ABOVE:.0%} of the GPU, it may run out of memory (VISUAL_TOKENS "
                      f"'base' or fewer MAX_VIEWS leave room)", stacklevel=2)


def _part(name: str) -> str | None:
    """Which trainable part an adapter parameter belongs to (None: a base-model weight, always frozen)."""
    if "lora_" in name:
        return "vision_lora" if "vision_tower" in name else "llm_lora" if "language_model" in name else None
    return "projector" if PROJECTOR in name and "modules_to_save" in name else None


def trainable_parameters(model) -> dict:
    """Trainable parameter counts per component of the model."""
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0, "other": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            component = next((c for c in ("vision_tower", "language_model") if c in name),
                             "projector" if PROJECTOR in name else "other")
            counts[component] += param.numel()
    return counts


def set_trainable(model, stage: dict) -> dict:
    """Unfreeze exactly the stage's parts (call before creating its trainer); returns the counts."""
    for name, param in model.named_parameters():
        part = _part(name)
        param.requires_grad = part is not None and stage[part]
    return trainable_parameters(model)


def lora_config(config: dict) -> LoraConfig:
    stages = config["stages"]
    targets = [LLM_TARGETS] if any(s["llm_lora"] for s in stages) else []
    targets += [vision_targets(config["vision_lora_layers"])] if any(s["vision_lora"] for s in stages) else []
    # PEFT needs one LoRA target: a projector-only run keeps a frozen LLM LoRA whose zero B leaves the model unchanged.
    lora = config["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules="|".join(f"(?:{t})" for t in targets or [LLM_TARGETS]),
                      modules_to_save=[PROJECTOR], task_type="CAUSAL_LM")


def load_training_model(config: dict):
    """Base model (4-bit or not) + one PEFT adapter holding every part any stage trains; processor with the
    training chat template."""
    model, processor = load_model_and_processor(config["model_id"], visual_tokens=config["visual_tokens"],
                                                load_in_4bit=config["load_in_4bit"],
                                                dtype=torch_dtype(config["precision"]), token=get_secret("HF_TOKEN"))
    processor.chat_template = training_chat_template(processor)
    if config["load_in_4bit"]:
        # checkpointing is the trainer's (SFTConfig), through transformers' current API, not PEFT's deprecated one
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(config)), processor


def _trainer_arguments(config: dict, stage: dict, output_dir, batch_size: int, grad_accum: int,
                       select: bool = True) -> dict:
    """What every stage's trainer shares: epochs and learning rate, the run's precision, checkpoints, model selection
    on the held-out loss (`select` False: no held-out data, the last weights)."""
    return dict(
        output_dir=str(output_dir), num_train_epochs=stage["epochs"], learning_rate=stage["lr"],
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        fp16=config["precision"] == "fp16", bf16=config["precision"] == "bf16", use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if select else "no", eval_steps=config["save_steps"], save_strategy="steps",
        save_steps=config["save_steps"],
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient (vision_targets): no extra pass
        save_total_limit=config["save_total_limit"], load_best_model_at_end=select, metric_for_best_model="eval_loss",
        greater_is_better=False, logging_steps=config["logging_steps"], report_to="none", seed=config["seed"],
        # progress bars, not printed log dicts, whatever an import did to transformers' log level (green_score.green
        # sets it to ERROR on import, and disable_tqdm's default follows it)
        disable_tqdm=False, dataloader_num_workers=0)


def sft_config(config: dict, stage: dict, output_dir) -> SFTConfig:
    """TRL's settings for one SFT stage: the loss on the report tokens, no truncation of the longest study."""
    return SFTConfig(**_trainer_arguments(config, stage, output_dir, config["batch_size"], config["grad_accum"]),
                     assistant_only_loss=True, max_length=config["max_length"])


def dpo_batch(config: dict) -> tuple[int, int]:
    """(pairs per device, accumulation) of the preference stage: two sequences per pair, so half the SFT batch per
    step (at least one pair) and as many pairs per optimizer step as the SFT stages have studies."""
    pairs = max(1, config["batch_size"] // 2)
    return pairs, max(1, round(config["batch_size"] * config["grad_accum"] / pairs))


def dpo_config(config: dict, stage: dict, output_dir, select: bool = True) -> DPOConfig:
    """TRL's settings for the preference stage: sigmoid DPO at the run's beta, held-out preference loss selecting;
    no truncation (a VLM prompt's image tokens must all stay)."""
    return DPOConfig(**_trainer_arguments(config, stage, output_dir, *dpo_batch(config), select=select),
                     beta=config["preference"]["beta"], max_length=None)


def method_table(config: dict, run) -> list[dict]:
    """Per stage, what trains and how, read back from the LoraConfig and SFTConfig objects training will use."""
    lora = lora_config(config)
    rows = []
    for stage, stage_dir in zip(config["stages"], _stage_dirs(run, config)):
        args = (dpo_config if stage.get("dpo") else sft_config)(config, stage, stage_dir)
        rows.append({"stage": stage["name"], "epochs": args.num_train_epochs, "learning rate": args.learning_rate,
                     "schedule": str(args.lr_scheduler_type.value), "precision": config["precision"],
                     "4-bit base": config["load_in_4bit"], "batch x accumulation":
                     f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}",
                     "trains": ", ".join(part for part in ("llm_lora", "vision_lora", "projector") if stage[part]),
                     "LoRA r / alpha / dropout": f"{lora.r} / {lora.lora_alpha} / {lora.lora_dropout}",
                     "loss": (f"DPO ({', '.join(args.loss_type)}, beta {args.beta}) against the stage-2 adapter"
                              if stage.get("dpo") else "report tokens only"),
                     "selection": f"best {args.metric_for_best_model}, every {args.eval_steps} steps"
                                  + (" (held-out preference loss)" if stage.get("dpo") else "")})
    return rows


def make_trainer(model, processor, config: dict, stage: dict, output_dir, train_dataset, eval_dataset, callbacks=()):
    """A new trainer for one stage; TRL collates (images, chat template, assistant-only labels or preference pairs).

    The preference stage's DPOTrainer is given the PEFT model holding the stage-2 weights and no reference model: it
    then copies the adapter into a second, frozen PEFT adapter named "ref" and computes the reference log-probabilities
    through it (trl 1.16, DPOTrainer.__init__ and _compute_loss), so the reference is exactly the stage-2 model.
    """
    with trainable_in_fp32(model):
        if stage.get("dpo"):
            args = dpo_config(config, stage, output_dir, select=eval_dataset is not None)
            return DPOTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              processing_class=processor, callbacks=list(callbacks))
        return SFTTrainer(model=model, args=sft_config(config, stage, output_dir), train_dataset=train_dataset,
                          eval_dataset=eval_dataset, processing_class=processor, callbacks=list(callbacks))


@contextmanager
def trainable_in_fp32(model):
    """Every trainable parameter is fp32 after the block, in every precision, 4-bit or not.

    SFTTrainer and DPOTrainer cast a quantized model's trainable parameters to bf16 (trl 1.16), but the CUDA
    GradScaler that fp16 training uses cannot unscale bf16 gradients ("_amp_foreach_non_finite_check_and_unscale_cuda"
    not implemented for 'BFloat16'), and under autocast 16-bit master weights buy nothing. The tensors from before
    the block are put back, so weights trained in an earlier stage are not rounded through bf16 on the way.
    """
    before = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
    yield
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = before.get(name, param.data).float()


def mixed_precision(config: dict):
    """The autocast the Trainer trains under, for calls outside it: PEFT's `generate` calls the base model's, which
    bypasses the autocast accelerate wraps around `forward`, and the fp32 trainable copies (`trainable_in_fp32`)
    would then meet 16-bit activations ("expected m1 and m2 to have the same dtype")."""
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch_dtype(config["precision"]),
                          enabled=config["precision"] != "fp32")


def holdout_nlg(model, processor, config: dict, studies, store_path, limit: int = HOLDOUT_NLG_STUDIES) -> dict:
    """A cheap generation metric of the model's current weights: BLEU, ROUGE-L and CIDEr of greedy whole reports on
    the first `limit` held-out studies (no METEOR: its JVM is slow to start). Reported beside the held-out loss,
    which alone selects the checkpoint.

    Through the batch runner at the run's generation batch size (halved on out-of-memory), under the training
    autocast; the reports are kept in `store_path`, so a killed check resumes where it stopped.
    """
    studies = studies[:limit]
    model.eval()

    def generate(batch):
        with mixed_precision(config):
            return generate_batch(model, processor, [study_images(s, config["max_views"]) for s in batch],
                                  [s.id for s in batch], max_new_tokens=default_max_new_tokens(config))

    store, _ = run_sharded(open_store(store_path, key_field="id"), studies, lambda s: s.id, generate,
                           batch_size=config["generate_batch_size"], desc="held-out check", unit="study")
    return nlg_metrics([whole_report(s.regions) for s in studies],
                       [whole_report(store.get(s.id)["regions"]) for s in studies], meteor=False)


def stage_holdout_check(model, processor, config: dict, studies, stage_dir: Path) -> dict:
    """`holdout_nlg` of the stage's selected weights, or {"error": ...}: a diagnostic, never fatal, and run only after
    the stage's weights and record are saved."""
    set_peft_model_state_dict(model, load_peft_weights(str(stage_dir / "final")))
    try:
        return holdout_nlg(model, processor, config, studies, stage_dir / "holdout_predictions.jsonl")
    except Exception as error:  # noqa: BLE001  (the stage is saved; whatever failed here is reported, not raised)
        print(f"  WARNING: the held-out check failed ({type(error).__name__}: {error}); the stage's weights and "
              f"record are saved, and the run goes on")
        return {"error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        free_gpu_memory()


def _check_config(run, config: dict) -> None:
    """Write config.json, or refuse to resume a run that was started with other settings."""
    if run.config_path.is_file():
        old = run.config
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if changed:
            raise ValueError(f"{run.config_path}: this run was started with other settings {changed}; choose a new "
                             f"RUN_NAME or delete {run.train_dir} to start over")
    else:
        atomic_write_json(run.config_path, config)


def _stage_dirs(run, config: dict) -> list[Path]:
    return [run.checkpoints_dir / f"{i + 1}_{s['name']}" for i, s in enumerate(config["stages"])]


def train(run, config: dict, train_studies, holdout_studies, callbacks=(), judge=None) -> dict:
    """Run (or resume) every stage of `run` (a `runs.Run`); returns the metrics also written to metrics.json.

    A finished stage is skipped; an unfinished one resumes from its last checkpoint (step count continues).
    A preference stage first makes its pairs (`make_preference_pairs`, with `judge`: `preference.make_judge`).
    Under `torchrun` / `accelerate launch` every process runs this (the Trainer's DDP); only the main process writes
    config.json, the stage records, the adapter and the metrics, and the others wait for it before reading them.
    """
    state = processes()
    config = {**config, "holdout_ids": sorted(s.id for s in holdout_studies), "n_train": len(train_studies)}
    if "preference" in config and judge is None:
        raise ValueError(f"preset {config['preset']!r} has a preference stage: pass judge=preference.make_judge(...)")
    with state.main_process_first():  # the main process writes config.json; the others then compare theirs with it
        _check_config(run, config)
    if run.metrics_path.is_file() and run.trained:
        print(f"{run.name}: already trained; delete {run.train_dir} to train again")
        return json.loads(run.metrics_path.read_text(encoding="utf-8"))
    model, processor = load_training_model(config)
    if state.is_main_process:
        processor.save_pretrained(run.adapter_dir)  # now: TRL's collator leaves its truncation length in the tokenizer
    train_dataset = build_dataset(train_studies, config["max_views"])
    holdout_dataset = build_dataset(holdout_studies, config["max_views"])
    metrics = {"run": run.name, "stages": []}
    stage_dirs = _stage_dirs(run, config)
    for index, (stage, stage_dir) in enumerate(zip(config["stages"], stage_dirs)):
        done = stage_dir / "stage_done.json"
        if done.is_file():
            print(f"stage {index + 1} ({stage['name']}): done earlier, skipped")
            record = json.loads(done.read_text(encoding="utf-8"))
        else:
            datasets = train_dataset, holdout_dataset
            if stage.get("dpo"):
                if not run.preferences_path.is_file():  # the phases one model at a time: candidates, judge, DPO
                    sampling = generate_candidates(model, processor, config, stage_dirs[index - 1] / "final", run,
                                                   preference_studies(config, train_studies, holdout_studies))
                    del model, processor
                    free_gpu_memory()
                    make_preference_pairs(run, config, train_studies, holdout_studies, judge, sampling)
                    model, processor = load_training_model(config)
                datasets = preference_datasets(run, config, train_studies + holdout_studies)
            record = _train_stage(model, processor, config, index, stage_dirs, *datasets, callbacks)
            if stage.get("dpo"):
                record["preference"] = json.loads(run.preference_summary_path.read_text(encoding="utf-8"))
            if state.is_main_process:  # the weights and the record first: the held-out check is a diagnostic
                atomic_write_json(done, record)
            state.wait_for_everyone()  # the next stage and the check read this stage's final weights
        if "holdout_nlg" not in record:  # absent: not run yet, or killed midway (it resumes); a failure is recorded
            record["holdout_nlg"] = stage_holdout_check(model, processor, config, holdout_studies, stage_dir)
            if state.is_main_process:
                atomic_write_json(done, record)
            state.wait_for_everyone()
        metrics["stages"].append(record)
    # the last stage's selected weights, also when every stage had finished before this call
    set_peft_model_state_dict(model, load_peft_weights(str(stage_dirs[-1] / "final")))
    if state.is_main_process:
        model.save_pretrained(run.adapter_dir)
        atomic_write_json(run.metrics_path, metrics)
    state.wait_for_everyone()
    return metrics


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
                                         *({**c, "sampled": True} for c in samples)]}
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


def _train_stage(model, processor, config: dict, index: int, stage_dirs: list[Path], train_dataset, holdout_dataset,
                 callbacks) -> dict:
    """Train (or resume) one stage with a new trainer, save its selected weights to final/, release the trainer and
    its optimizer state; returns the stage's record."""
    stage, stage_dir = config["stages"][index], stage_dirs[index]
    if index:  # start from the previous stage's selected weights (also after a restart)
        set_peft_model_state_dict(model, load_peft_weights(str(stage_dirs[index - 1] / "final")))
    counts = set_trainable(model, stage)
    print(f"stage {index + 1} ({stage['name']}): {stage['epochs']} epoch(s), lr {stage['lr']}, trainable "
          + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    trainer = make_trainer(model, processor, config, stage, stage_dir, train_dataset, holdout_dataset, callbacks)
    last = get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
    resumed_from = int(Path(last).name.split("-")[-1]) if last else 0
    if last:
        print(f"  resuming from {last}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.time() - start
    trainer.save_model(str(stage_dir / "final"))  # by the main process only (the Trainer's `should_save`)
    record = _stage_record(index, stage, counts, trainer.state, resumed_from, seconds, config,
                           processes().num_processes)
    if "ref" in model.peft_config:  # DPOTrainer's frozen copy of the stage-2 adapter: not part of the run's adapter
        model.delete_adapter("ref")
    trainer.accelerator.free_memory()  # the optimizer state and gradients go before anything generates
    del trainer
    free_gpu_memory()
    return record


def _stage_record(index: int, stage: dict, counts: dict, trainer_state, resumed_from: int, seconds: float,
                  config: dict, n_processes: int) -> dict:
    # samples of this session: optimizer steps x batch per process x accumulation x processes
    samples = (trainer_state.global_step - resumed_from) * config["batch_size"] * config["grad_accum"] * n_processes
    return {"stage": index + 1, **stage, "trainable": counts, "global_step": trainer_state.global_step,
            "resumed_from_step": resumed_from, "processes": n_processes, "seconds": round(seconds, 1),
            "samples_per_second": round(samples / seconds, 3), "peak_gpu_memory_gb": peak_gpu_memory_gb(),
            "best_eval_loss": trainer_state.best_metric,
            "best_checkpoint": trainer_state.best_model_checkpoint and Path(trainer_state.best_model_checkpoint).name,
            "loss": [[h["step"], h["loss"]] for h in trainer_state.log_history if "loss" in h],
            "eval_loss": [[h["step"], h["eval_loss"]] for h in trainer_state.log_history if "eval_loss" in h],
            # DPO's held-out reward accuracy (chosen above rejected) and margin, when the stage is one
            **{name: [[h["step"], h[f"eval_rewards/{key}"]] for h in trainer_state.log_history
                      if f"eval_rewards/{key}" in h]
               for name, key in (("eval_reward_accuracy", "accuracies"), ("eval_reward_margin", "margins"))
               if stage.get("dpo")}}
