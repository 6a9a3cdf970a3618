"""What trains and how, for every stage of notebook 02: LoRA targets and the parts each stage unfreezes, TRL's
SFTConfig / DPOConfig and trainers, fp32 trainable weights, the training autocast, and the computed memory check.

TRL's fused LM head is set for this torch and GPU on import (helpers/train/fixes.py), before any trainer runs.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import torch
from peft import LoraConfig
from transformers import AutoModelForImageTextToText
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from ..model.families import family_of
from ..model.modeling import checkpoint_family, model_config as mode_config
from ..core.settings import torch_dtype
from .fixes import configure_fused_head

configure_fused_head()  # TRL's fused LM head set for this torch and GPU, before any trainer runs

# trl 1.16's DPOTrainer calls transformers' deprecated checkpointing names each step: nothing a user can change
warnings.filterwarnings("ignore", r"`(is_gradient_checkpointing|gradient_checkpointing_(en|dis)able)` is deprecated",
                        FutureWarning)
WARN_ABOVE = 0.8  # of the GPU's memory: what the estimate leaves out (CUDA context, allocator slack) is not small


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
    family = family_of(model_config)
    targets = lora_config(config, family).target_modules
    lora = sum(config["lora"]["r"] * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, name))
    projector = sum(p.numel() for p in model.model.get_submodule(family.projector).parameters())
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


def _family(model):
    """The family of a PEFT model's base checkpoint (its module names)."""
    return checkpoint_family(model.peft_config[model.active_adapter].base_model_name_or_path)


def _part(name: str, family) -> str | None:
    """Which trainable part an adapter parameter belongs to (None: a base-model weight, always frozen)."""
    if "lora_" in name:
        return "vision_lora" if family.vision_tower in name else "llm_lora" if "language_model" in name else None
    return "projector" if family.projector in name and "modules_to_save" in name else None


def trainable_parameters(model) -> dict:
    """Trainable parameter counts per component of the model."""
    family = _family(model)
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0, "other": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # the projector first: Qwen2.5-VL's is inside its vision tower (visual.merger)
            component = ("projector" if family.projector in name else "vision_tower" if family.vision_tower in name
                         else "language_model" if "language_model" in name else "other")
            counts[component] += param.numel()
    return counts


def set_trainable(model, stage: dict) -> dict:
    """Unfreeze exactly the stage's parts (call before creating its trainer); returns the counts."""
    family = _family(model)
    for name, param in model.named_parameters():
        part = _part(name, family)
        param.requires_grad = part is not None and stage[part]
    return trainable_parameters(model)


def lora_config(config: dict, family=None) -> LoraConfig:
    """The run's LoRA: its family's LLM and vision-tower targets for the parts its stages train, the projector
    trained in full. `family` None: the family of the run's checkpoint, read from its config."""
    stages, family = config["stages"], family or checkpoint_family(config["model_id"])
    targets = [family.llm_targets] if any(s["llm_lora"] for s in stages) else []
    targets += [family.vision_targets(config["vision_lora_layers"])] if any(s["vision_lora"] for s in stages) else []
    # PEFT needs one LoRA target: a projector-only run keeps a frozen LLM LoRA whose zero B leaves the model unchanged.
    lora = config["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules="|".join(f"(?:{t})" for t in targets or [family.llm_targets]),
                      modules_to_save=[family.projector], task_type="CAUSAL_LM")


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


def sft_config(config: dict, stage: dict, output_dir, messages: bool = False) -> SFTConfig:
    """TRL's settings for one SFT stage: the loss on the report tokens (TRL's template marks them in `messages` rows,
    else the `completion` of prompt-completion rows: examples.training_text, whose form `messages` names; TRL
    refuses rows of the other form), no truncation of the longest study."""
    return SFTConfig(**_trainer_arguments(config, stage, output_dir, config["batch_size"], config["grad_accum"]),
                     assistant_only_loss=messages, completion_only_loss=not messages, max_length=config["max_length"])


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
        args = sft_config(config, stage, output_dir, messages="messages" in train_dataset.column_names)
        return SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=processor, callbacks=list(callbacks))


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
