"""Notebook 02: LoRA/QLoRA fine-tuning of LLaVA-NeXT with TRL, in stages, resumable, settings saved for notebook 03.

A run lives in `ARTIFACTS_DIR/train/<run>/`: `config.json` (every setting notebook 03 needs), `checkpoints/<stage>/`
(TRL checkpoints, then `final/` and `stage_done.json`), `adapter/` (PEFT adapter + processor) and `metrics.json`.
"""
from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from .modeling import image_tokens_per_view
from .reports import INSTRUCTION, format_report, user_message
from .storage import atomic_write_json, sha256

# PEFT full-matches these against module paths such as "model.language_model.layers.0.self_attn.q_proj".
LLM_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r"model\.vision_tower\..*\.(q_proj|k_proj|v_proj|out_proj)"
PROJECTOR = "multi_modal_projector"
PARTS = ("vision_lora", "projector", "llm_lora")


def _stage(name, epochs, lr, vision_lora, projector, llm_lora):
    return {"name": name, "epochs": epochs, "lr": lr, "vision_lora": vision_lora, "projector": projector,
            "llm_lora": llm_lora}


# Each stage gets a new trainer, hence a fresh optimizer and scheduler. epochs=None: what the others leave of EPOCHS.
PRESETS = {
    "two_stage": [_stage("frozen_vision", 1, 2e-4, False, True, True), _stage("vision_lora", None, 1e-4, True, True, True)],
    "qlora": [_stage("llm_lora", None, 2e-4, False, True, True)],
    "r2gengpt_shallow": [_stage("projector", None, 1e-4, False, True, False)],
    "r2gengpt_delta": [_stage("projector_vision_lora", None, 1e-4, True, True, False)],
}

def resolve_stages(preset: str, epochs: int, lr_scale: float = 1) -> list[dict]:
    if preset not in PRESETS:
        raise ValueError(f"unknown PRESET {preset!r}; choose one of {sorted(PRESETS)}")
    stages = [{**s, "lr": s["lr"] * lr_scale} for s in PRESETS[preset]]
    rest = epochs - sum(s["epochs"] for s in stages if s["epochs"] is not None)
    for stage in stages:
        if stage["epochs"] is None:
            stage["epochs"] = rest
    if any(s["epochs"] < 1 for s in stages):
        raise ValueError(f"preset {preset!r} needs more than {epochs} epoch(s): stages {stages}")
    return stages


def make_config(settings, *, model_id: str, max_length: int, preset: str = "two_stage", epochs: int | None = None,
                max_views: int = 3, visual_tokens: str | None = None, load_in_4bit: bool | None = None,
                lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, stages: list[dict] | None = None,
                seed: int = 0, **extra) -> dict:
    """Every setting of a run, JSON-ready: written to config.json and read back by notebooks 03 and 04.

    `settings` (helpers.setup) gives the profile's values; None arguments take them. `stages` replaces the preset's
    stages (same keys as PRESETS); `extra` adds settings (e.g. token stats) or overrides the profile's (save_steps).
    """
    epochs = epochs or settings.epochs
    config = {"model_id": str(model_id), "profile": settings.profile, "preset": preset,
              "precision": settings.precision,
              "load_in_4bit": settings.load_in_4bit if load_in_4bit is None else load_in_4bit,
              "visual_tokens": visual_tokens or settings.visual_tokens, "batch_size": settings.batch_size,
              "grad_accum": settings.grad_accum, "epochs": epochs, "save_steps": settings.save_steps,
              "save_total_limit": 2, "logging_steps": settings.logging_steps,
              "stages": stages or resolve_stages(preset, epochs, settings.lr_scale), "max_views": max_views,
              "max_length": max_length, "instruction": INSTRUCTION,
              "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout}, "seed": seed, **extra}
    return json.loads(json.dumps(config))  # tuples to lists, so a reloaded config compares equal


def load_run_config(run_dir) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train this run with notebook 02 first (or check RUN_NAME)")
    return json.loads(path.read_text(encoding="utf-8"))


def holdout_split(studies, fraction: float = 0.05, min_count: int = 2):
    """(train, holdout) from the train split only; a study's side depends on its id alone, so reruns agree."""
    wrong = [s.id for s in studies if s.split != "train"]
    if wrong:
        raise ValueError(f"model selection uses a slice of the train split only; got non-train studies {wrong[:5]}")
    ranked = sorted(studies, key=lambda s: sha256("holdout", s.id))
    held = {s.id for s in ranked[:max(min_count, round(len(studies) * fraction))]}
    return [s for s in studies if s.id not in held], [s for s in studies if s.id in held]


def conversation(study, max_views: int) -> list[dict]:
    """The training conversation: the shared user turn, then the four-region target."""
    target = format_report(study.regions)
    return [user_message(len(study.image_paths[:max_views])),
            {"role": "assistant", "content": [{"type": "text", "text": target}]}]


def build_dataset(studies, max_views: int):
    """`messages` + `images`; images stay paths until read, decoded to RGB by `datasets` (memory stays flat)."""
    from datasets import Dataset, Image, List

    rows = [{"messages": conversation(s, max_views), "images": [str(p) for p in s.image_paths[:max_views]]}
            for s in studies]
    return Dataset.from_list(rows).cast_column("images", List(Image(mode="RGB")))


def token_counts(studies, processor, max_views: int) -> list[dict]:
    """Per study: image tokens (from each view's size), text tokens and their total, as the trainer will see them.

    Reads only image headers, so it is fast on the full data set. `processor` must carry the training template.
    """
    from PIL import Image

    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = []
    for study in studies:
        image_tokens = 0
        for path in study.image_paths[:max_views]:
            with Image.open(path) as image:
                image_tokens += image_tokens_per_view(processor, *image.size)
        messages = conversation(study, max_views)
        text = processor.apply_chat_template(messages, tokenize=False)
        ids = processor.tokenizer(text, add_special_tokens=False).input_ids
        target = processor.tokenizer(messages[1]["content"][0]["text"], add_special_tokens=False).input_ids
        text_tokens = sum(1 for i in ids if i != image_token)
        counts.append({"id": study.id, "image_tokens": image_tokens, "text_tokens": text_tokens,
                       "target_tokens": len(target) + 1, "total": image_tokens + text_tokens})  # +1: </s>
    return counts


def describe(values: list[int]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"n={len(ordered)} min={ordered[0]} median={statistics.median(ordered):g} p95={p95} "
            f"max={ordered[-1]}")


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


def lora_config(config: dict):
    from peft import LoraConfig

    stages = config["stages"]
    targets = [LLM_TARGETS] if any(s["llm_lora"] for s in stages) else []
    targets += [VISION_TARGETS] if any(s["vision_lora"] for s in stages) else []
    # PEFT needs one LoRA target: a projector-only run keeps a frozen LLM LoRA whose zero B leaves the model unchanged.
    lora = config["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules="|".join(f"(?:{t})" for t in targets or [LLM_TARGETS]),
                      modules_to_save=[PROJECTOR], task_type="CAUSAL_LM")


def load_training_model(config: dict):
    """Base model (4-bit or not) + one PEFT adapter holding every part any stage trains; processor with the
    training chat template."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .env import get_secret
    from .modeling import load_model_and_processor, training_chat_template
    from .settings import torch_dtype

    model, processor = load_model_and_processor(config["model_id"], visual_tokens=config["visual_tokens"],
                                                load_in_4bit=config["load_in_4bit"],
                                                dtype=torch_dtype(config["precision"]), token=get_secret("HF_TOKEN"))
    processor.chat_template = training_chat_template(processor)
    if config["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(config)), processor


def make_trainer(model, processor, config: dict, stage: dict, output_dir, train_dataset, eval_dataset, callbacks=()):
    """A new SFTTrainer for one stage; TRL collates (images, chat template, assistant-only labels)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(output_dir), num_train_epochs=stage["epochs"], learning_rate=stage["lr"],
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
        per_device_train_batch_size=config["batch_size"], per_device_eval_batch_size=config["batch_size"],
        gradient_accumulation_steps=config["grad_accum"],
        fp16=config["precision"] == "fp16", bf16=config["precision"] == "bf16", use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        assistant_only_loss=True, max_length=config["max_length"],
        eval_strategy="steps", eval_steps=config["save_steps"], save_strategy="steps", save_steps=config["save_steps"],
        save_total_limit=config["save_total_limit"], load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=False, logging_steps=config["logging_steps"], report_to="none", seed=config["seed"],
        dataloader_num_workers=0, disable_tqdm=False)
    with trainable_in_fp32(model):
        return SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=processor, callbacks=list(callbacks))


@contextmanager
def trainable_in_fp32(model):
    """Every trainable parameter is fp32 after the block, in every precision, 4-bit or not.

    SFTTrainer casts a quantized model's trainable parameters to bf16 (trl 1.16, sft_trainer.py), but the CUDA
    GradScaler that fp16 training uses cannot unscale bf16 gradients ("_amp_foreach_non_finite_check_and_unscale_cuda"
    not implemented for 'BFloat16'), and under autocast 16-bit master weights buy nothing. The tensors from before
    the block are put back, so weights trained in an earlier stage are not rounded through bf16 on the way.
    """
    before = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
    yield
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = before.get(name, param.data).float()


def _check_config(run_dir: Path, config: dict) -> None:
    """Write config.json, or refuse to resume a run that was started with other settings."""
    path = run_dir / "config.json"
    if path.is_file():
        old = load_run_config(run_dir)
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if changed:
            raise ValueError(f"{path}: this run was started with other settings {changed}; choose a new RUN_NAME "
                             f"or delete {run_dir} to start over")
    else:
        atomic_write_json(path, config)


def _stage_dirs(run_dir: Path, config: dict) -> list[Path]:
    return [run_dir / "checkpoints" / f"{i + 1}_{s['name']}" for i, s in enumerate(config["stages"])]


def train(run_dir, config: dict, train_studies, holdout_studies, callbacks=()) -> dict:
    """Run (or resume) every stage; returns the metrics also written to metrics.json.

    A finished stage is skipped; an unfinished one resumes from its last checkpoint (step count continues).
    """
    import torch
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers.trainer_utils import get_last_checkpoint

    from .env import peak_gpu_memory_gb

    run_dir = Path(run_dir)
    config = {**config, "holdout_ids": sorted(s.id for s in holdout_studies), "n_train": len(train_studies)}
    _check_config(run_dir, config)
    if (run_dir / "metrics.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file():
        print(f"{run_dir.name}: already trained; delete {run_dir} to train again")
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    model, processor = load_training_model(config)
    processor.save_pretrained(run_dir / "adapter")  # now: TRL's collator leaves its truncation length in the tokenizer
    train_dataset = build_dataset(train_studies, config["max_views"])
    holdout_dataset = build_dataset(holdout_studies, config["max_views"])
    metrics = {"run": run_dir.name, "stages": []}
    stage_dirs = _stage_dirs(run_dir, config)
    for index, (stage, stage_dir) in enumerate(zip(config["stages"], stage_dirs)):
        done = stage_dir / "stage_done.json"
        if done.is_file():
            print(f"stage {index + 1} ({stage['name']}): done earlier, skipped")
            metrics["stages"].append(json.loads(done.read_text(encoding="utf-8")))
            continue
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
        trainer.save_model(str(stage_dir / "final"))
        state = trainer.state
        samples = (state.global_step - resumed_from) * config["batch_size"] * config["grad_accum"]
        record = {
            "stage": index + 1, **stage, "trainable": counts, "global_step": state.global_step,
            "resumed_from_step": resumed_from, "seconds": round(seconds, 1),
            "samples_per_second": round(samples / seconds, 3),  # of this session: steps x batch x accumulation
            "peak_gpu_memory_gb": peak_gpu_memory_gb(), "best_eval_loss": state.best_metric,
            "best_checkpoint": state.best_model_checkpoint and Path(state.best_model_checkpoint).name,
            "loss": [[h["step"], h["loss"]] for h in state.log_history if "loss" in h],
            "eval_loss": [[h["step"], h["eval_loss"]] for h in state.log_history if "eval_loss" in h]}
        atomic_write_json(done, record)
        metrics["stages"].append(record)
    # the last stage's selected weights, also when every stage had finished before this call
    set_peft_model_state_dict(model, load_peft_weights(str(stage_dirs[-1] / "final")))
    model.save_pretrained(run_dir / "adapter")
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def plot_metrics(metrics: dict):
    """Training and held-out loss over the whole run (stages one after another)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    offset = 0
    for stage in metrics["stages"]:
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            points = stage[key]
            if points:
                ax.plot([offset + s for s, _ in points], [v for _, v in points], style,
                        label=f"{stage['stage']} {stage['name']} {'held-out' if key == 'eval_loss' else 'train'}")
        offset += stage["global_step"]
        ax.axvline(offset, color="grey", lw=0.5)
    ax.set_xlabel("optimizer step (whole run)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
