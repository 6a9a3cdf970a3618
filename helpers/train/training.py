"""Notebook 02: LoRA/QLoRA fine-tuning of LLaVA-NeXT with TRL, in stages, resumable; the run's settings are saved
for notebooks 03 and 04 (layout: helpers/core/runs.py).

The method in one place: `PRESETS` (what trains in each stage), `lora_config` (targets, rank), `sft_config` (learning
rate, precision, batch, schedule, model selection) and `method_table` (all of it, read back from those objects).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peft import get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import AutoConfig
from transformers.trainer_utils import get_last_checkpoint

from ..core.data import study_images
from ..model.generation import default_max_new_tokens, generate_batch
from ..core.errors import OptionError
from . import preference
from ..metrics.nlg import nlg_metrics
from ..model.modeling import load_model_and_processor, training_chat_template, vision_layers_used
from .preference_stage import generate_candidates, make_preference_pairs, preference_datasets, preference_studies
from ..core.report_format import INSTRUCTION, whole_report
from ..core.settings import (batch_that_fits, get_secret, gpu, parameter_count, peak_gpu_memory_gb, processes,
                             torch_dtype)
from ..core.storage import atomic_write_json, free_gpu_memory, open_store, run_sharded
from .examples import build_dataset
from .recipe import (WARN_ABOVE, check_memory, dpo_config, lora_config, make_trainer, memory_estimate_gib,
                     mixed_precision, set_trainable, sft_config)
from .fixes import one_set_of_input_grad_hooks

HOLDOUT_NLG_STUDIES = 32  # held-out studies generated after each stage for `holdout_nlg`: a cheap check, not a test


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
        raise OptionError(f"unknown PRESET {preset!r}; choose one of {sorted(PRESETS)}")
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
                preference: dict | None = None, seed: int = 0, parameters: int | None = None, **extra) -> dict:
    """Every setting of a run, JSON-ready: written to config.json and read back by notebooks 03 and 04.

    `settings` (helpers.setup) gives the profile's values; None arguments take them. Under `torchrun` / `accelerate
    launch` the gradient accumulation is divided among the processes. `stages` replaces the preset's
    stages (same keys as PRESETS); `preference` (`preference.preference_settings`) is required by a preset with a
    preference stage; `extra` adds settings (e.g. token stats) or overrides the profile's (save_steps). 4-bit and
    the batch follow the model's size (`parameters`, None: counted from its config; recorded with its family).
    """
    epochs = epochs or settings.epochs
    stages = stages or resolve_stages(preset, epochs, settings.lr_scale)
    if any(s.get("dpo") for s in stages) != (preference is not None):
        raise ValueError(f"preset {preset!r}: preference settings (preference.preference_settings) go with a "
                         f"preference stage, and only with one")
    n_processes = processes().num_processes
    model_config = AutoConfig.from_pretrained(model_id, token=get_secret("HF_TOKEN"))
    parameters = parameters or parameter_count(model_config)
    sized = settings.for_model(parameters)
    config = {"model_id": str(model_id), "family": model_config.model_type, "parameters": parameters,
              "profile": settings.profile, "preset": preset, "precision": settings.precision,
              "load_in_4bit": sized.load_in_4bit if load_in_4bit is None else load_in_4bit,
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
    if config["load_in_4bit"] != settings.load_in_4bit and settings.gpu_memory_gb and max_length and (
            "batch_size" not in extra):
        # the profile's batch is set for the default 7B in the profile's precision: a model trained the other way
        # gets the largest batch whose computed peak fits, at the same effective batch
        peak = lambda batch: sum(memory_estimate_gib({**config, "batch_size": batch}, model_config).values())
        batch, accumulation = batch_that_fits(settings.batch_size * settings.grad_accum, peak,
                                              settings.gpu_memory_gb, WARN_ABOVE)
        config.update(batch_size=batch, grad_accum=max(1, round(accumulation / n_processes)))
    config = json.loads(json.dumps(config))  # tuples to lists, so a reloaded config compares equal
    check_memory(config, model_config, settings.gpu_memory_gb)
    return config


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
    one_set_of_input_grad_hooks(model)
    return get_peft_model(model, lora_config(config)), processor


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
        # the model's family and size follow from its id: a run begun before they were recorded resumes
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k)
                         and not (k in ("family", "parameters") and k not in old))
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
    train_dataset = build_dataset(train_studies, config["max_views"], processor)
    holdout_dataset = build_dataset(holdout_studies, config["max_views"], processor)
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
            "resumed_from_step": resumed_from, "processes": n_processes, "gpu": gpu()[0], "seconds": round(seconds, 1),
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
