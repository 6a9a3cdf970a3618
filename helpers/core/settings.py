"""The one settings step: which GPU this is, which profile that means, and every setting the notebooks take from it;
also the machine's secrets (never printed or stored) and its GPU memory figures.

Every notebook calls `helpers.setup(PROFILE, DATA_DIR, ARTIFACTS_DIR)` once; a notebook parameter left as None means
"from these settings", and is resolved here only.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch

from .errors import MissingError, OptionError

DRIVE_ROOT = Path("/content/drive/MyDrive/xray-rrg")
REPO_ROOT = Path(__file__).resolve().parents[2]
# How long a process waits for the others at a barrier: the main process alone may load a 7B model or embed every
# study first (torch's default for NCCL is 10 minutes).
PROCESS_WAIT = timedelta(hours=2)
SMALL_GPU_GIB = 24  # below this a 7B model in 16 bits (~14 GiB of weights) leaves too little room: load it in 4-bit
# GREEN's judge runs as GREEN runs it (fp16) wherever its 13.5 GB of fp16 weights fit beside a batch: 4-bit only below
# this (a T4), where a 4-bit build scores differently (docs/02_sft_lora_qlora.md, "Settings")
JUDGE_4BIT_BELOW_GIB = 20
GREEN_TOKEN_BUDGET = 2048  # GREEN truncates prompts to 2,048 tokens and lets answers run to that total
TRITON_MIN_CAPABILITY = (8, 0)  # Triton's officially supported floor (T4 and V100 are below it)
# A model loads in 4-bit where its 16-bit weights (2 bytes a parameter) would take more than this share of the GPU's
# memory: training leaves room for LoRA's Adam state and a long multimodal sequence's activations, inference for a
# batch's KV cache. llava-v1.6-mistral-7b (7.57 B parameters, 14.1 GiB) comes out as the profiles were set for it:
# QLoRA below 35.3 GiB, 4-bit inference below 24.3 GiB; a 0.9 B model (llava-interleave-qwen-0.5b) is 16-bit on a T4.
TRAIN_16BIT_SHARE, INFERENCE_16BIT_SHARE = 0.4, 0.58

# What each profile trains and runs with. Precision is not a profile setting: it follows the GPU (`precision_for`).
# visual_tokens "base" everywhere: for a near-square X-ray, "tile" adds a second copy of the same 336 px image and
# "anyres" costs 5x the tokens (docs/02_sft_lora_qlora.md, "Visual tokens"); both stay one parameter away.
PROFILES = {
    # tiny random models built offline, on the CPU; the 10x learning rate lets them learn the format in a few steps
    "demo": dict(load_in_4bit=False, batch_size=2, grad_accum=1, epochs=3, save_steps=4, logging_steps=1,
                 lr_scale=10, generate_batch_size=4, judge_batch_size=8, judge_max_new_tokens=16),
    # 15 GiB (T4, P100, V100-16GB): QLoRA
    "t4": dict(load_in_4bit=True, batch_size=1, grad_accum=8, epochs=3, save_steps=50, logging_steps=10,
               lr_scale=1, generate_batch_size=8, judge_batch_size=8, judge_max_new_tokens=GREEN_TOKEN_BUDGET),
    # 22-24 GiB (L4, A10, RTX 3090/4090): QLoRA, same effective batch
    "l4": dict(load_in_4bit=True, batch_size=1, grad_accum=8, epochs=3, save_steps=50, logging_steps=10,
               lr_scale=1, generate_batch_size=8, judge_batch_size=4, judge_max_new_tokens=GREEN_TOKEN_BUDGET),
    # 40 GiB and more (A100, H100): 16-bit LoRA
    "a100": dict(load_in_4bit=False, batch_size=4, grad_accum=2, epochs=3, save_steps=50, logging_steps=10,
                 lr_scale=1, generate_batch_size=16, judge_batch_size=16, judge_max_new_tokens=GREEN_TOKEN_BUDGET),
}


def pick_profile(gpu_memory_gb: float | None, compute_capability: tuple[int, int] | None) -> str:
    """The profile for a GPU with this much memory (GiB, as torch reports it); None: no GPU, the demo.

    The capability does not change the profile (precision follows it separately, see `precision_for`).
    """
    if gpu_memory_gb is None:
        return "demo"
    if gpu_memory_gb < 20:
        return "t4"
    return "l4" if gpu_memory_gb < 35 else "a100"  # an A100-40GB reports 39.4


def precision_for(compute_capability: tuple[int, int] | None) -> str:
    """fp16 below compute capability 8 (T4, V100: no bf16), bf16 from Ampere on, fp32 without a GPU."""
    if compute_capability is None:
        return "fp32"
    return "bf16" if compute_capability[0] >= 8 else "fp16"


def fused_head_path(compute_capability: tuple[int, int] | None) -> str:
    """Which kernels TRL's fused LM head (SFT and DPO losses) runs: its Triton ones from compute capability 8.0, its
    torch path below (and on the CPU), since Triton does not support older GPUs (helpers/train/fixes.py)."""
    if compute_capability is None:
        return "torch (no GPU)"
    if tuple(compute_capability) >= TRITON_MIN_CAPABILITY:
        return "triton"
    return "torch (compute capability {}.{} is below Triton's 8.0)".format(*compute_capability)


def gpu() -> tuple[str | None, float | None, tuple[int, int] | None]:
    """(name, memory in GiB, compute capability) of GPU 0, or Nones without one."""
    if not torch.cuda.is_available():
        return None, None, None
    props = torch.cuda.get_device_properties(0)
    return props.name, round(props.total_memory / 2**30, 1), (props.major, props.minor)


@dataclass(frozen=True)
class Settings:
    profile: str
    data_dir: Path
    artifacts_dir: Path
    gpu_name: str | None
    gpu_memory_gb: float | None
    precision: str  # "fp16" | "bf16" | "fp32": mixed precision of training, dtype of every 16-bit model
    offline: bool  # demo: tiny random models built here, no API calls, no downloads
    inference_4bit: bool  # the default 7B, the retrieval model and the hf splitter load in 4-bit (`for_model`: by size)
    judge_precision: str  # dtype of the GREEN judge: GREEN's own fp16 on every GPU (fp32 on the CPU)
    judge_4bit: bool  # the GREEN judge in 4-bit nf4 (fp16 compute): only where fp16 weights cannot fit
    load_in_4bit: bool  # training the default 7B: QLoRA (4-bit base model) or 16-bit LoRA (`for_model`: by size)
    batch_size: int
    grad_accum: int
    epochs: int
    save_steps: int
    logging_steps: int
    lr_scale: float
    generate_batch_size: int  # a start: generation halves it on out-of-memory
    judge_batch_size: int  # likewise
    judge_max_new_tokens: int  # GREEN's: answers run to its 2,048-token total (prompt included)
    fused_lm_head: str  # TRL's fused LM head in training: "triton" or its torch path (`fused_head_path`)
    visual_tokens: str = "base"

    @property
    def dtype(self):
        return torch_dtype(self.precision)

    def for_model(self, parameters: int) -> "Settings":
        """These settings for a model of this many parameters: 4-bit for training and inference by its 16-bit weights
        against this GPU's memory (`needs_4bit`); no GPU: unchanged. The batch size follows in
        `training.make_config`, which has the model's shapes (`batch_that_fits`)."""
        if self.gpu_memory_gb is None or self.offline:
            return self
        return replace(self, load_in_4bit=needs_4bit(parameters, self.gpu_memory_gb, TRAIN_16BIT_SHARE),
                       inference_4bit=needs_4bit(parameters, self.gpu_memory_gb, INFERENCE_16BIT_SHARE))

    def for_model_id(self, model_id) -> "Settings":
        """`for_model` of a checkpoint (a hub id or a folder), sized from its config alone; no GPU: unchanged."""
        if self.gpu_memory_gb is None or self.offline:
            return self
        from transformers import AutoConfig

        return self.for_model(parameter_count(AutoConfig.from_pretrained(model_id, token=get_secret("HF_TOKEN"))))

    def __str__(self) -> str:
        return "\n".join(f"{k:>21}: {v}" for k, v in asdict(self).items())


def needs_4bit(parameters: int, gpu_memory_gb: float, share: float) -> bool:
    """Whether a model's 16-bit weights take more than `share` of the GPU's memory (GiB)."""
    return 2 * parameters / 2**30 > share * gpu_memory_gb


def parameter_count(model_config, module: str = "") -> int:
    """A model's parameters (or one module's, e.g. "model.vision_tower"), counted from its config alone: the model
    built on the meta device (no weights, no memory), through the class the project loads it with."""
    from transformers import AutoModelForImageTextToText  # the library only where a model is sized

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_config)
    return sum(p.numel() for p in model.get_submodule(module).parameters())


def batch_that_fits(effective_batch: int, peak_gib, gpu_memory_gb: float, share: float) -> tuple[int, int]:
    """(batch, accumulation) keeping the effective batch: the largest batch that divides it and whose computed peak
    `peak_gib(batch)` (GiB) stays within `share` of the GPU's memory; batch 1 when none does (the memory check
    then says why it cannot fit)."""
    for batch in range(effective_batch, 0, -1):
        if effective_batch % batch == 0 and peak_gib(batch) <= share * gpu_memory_gb:
            return batch, effective_batch // batch
    return 1, effective_batch


def resolve(profile: str | None = None, data_dir=None, artifacts_dir=None) -> Settings:
    """Settings for this machine without touching the file system (setup() also mounts Drive and checks the data)."""
    name, memory, capability = gpu()
    profile = profile or pick_profile(memory, capability)
    if profile not in PROFILES:
        raise OptionError(f"unknown PROFILE {profile!r}; choose one of {sorted(PROFILES)} (None: from the GPU)")
    offline = profile == "demo"
    if offline:
        default_data, default_artifacts = REPO_ROOT / "data" / "sample", REPO_ROOT / "artifacts" / "demo"
    elif in_colab():
        default_data, default_artifacts = DRIVE_ROOT / "data", DRIVE_ROOT / "artifacts"
    else:
        default_data, default_artifacts = REPO_ROOT / "data", REPO_ROOT / "artifacts"
    return Settings(profile=profile, data_dir=Path(data_dir or default_data).resolve(),
                    artifacts_dir=Path(artifacts_dir or default_artifacts).resolve(), gpu_name=name,
                    gpu_memory_gb=memory, precision="fp32" if offline else precision_for(capability), offline=offline,
                    inference_4bit=memory is not None and memory < SMALL_GPU_GIB and not offline,
                    judge_precision="fp16" if memory is not None and not offline else "fp32",
                    judge_4bit=memory is not None and memory < JUDGE_4BIT_BELOW_GIB and not offline,
                    fused_lm_head=fused_head_path(capability),
                    **PROFILES[profile])


def setup(profile: str | None = None, data_dir=None, artifacts_dir=None) -> Settings:
    """The notebooks' first step: settings for this GPU and profile, Drive mounted in Colab, the data checked."""
    if in_colab() and profile != "demo":
        from google.colab import drive

        drive.mount("/content/drive")
    check_one_gpu_per_process()
    settings = resolve(profile, data_dir, artifacts_dir)
    annotation = settings.data_dir / "annotation.json"
    if not annotation.is_file():
        raise MissingError(f"{annotation} not found: put annotation.json and images/ there (see "
                           f"docs/01_region_prompting.md, 'Data'), or set DATA_DIR")
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    print(settings)
    return settings


def check_one_gpu_per_process() -> None:
    """Several GPUs visible to one process (Kaggle's 2x T4, a lab node) without a launcher: the Trainer would wrap the
    model in nn.DataParallel, which TRL's SFTTrainer and DPOTrainer refuse; stop now, saying how to use one or all."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise RuntimeError(
            f"{count} GPUs are visible to this one process, and TRL's trainers cannot use them this way. Either use "
            f"one: set CUDA_VISIBLE_DEVICES=0 before torch starts (a notebook: restart the runtime and run "
            f"`import os; os.environ['CUDA_VISIBLE_DEVICES'] = '0'` first; a shell: `CUDA_VISIBLE_DEVICES=0 python -m "
            f"helpers ...`); or use all {count}: `torchrun --nproc-per-node {count} -m helpers train ...` (the same "
            f"for generate and evaluate, docs/scaling.md)")


def in_colab() -> bool:
    return "google.colab" in sys.modules


def torch_dtype(precision: str):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def default_dtype():
    """The dtype of 16-bit models on this machine: `precision_for` its GPU (fp32 on the CPU)."""
    return torch_dtype(precision_for(gpu()[2]))


def get_secret(name: str) -> str | None:
    """A secret from Colab's secrets panel or the environment; never printed or stored by this project."""
    if in_colab():
        try:
            from google.colab import userdata

            value = userdata.get(name)
            if value:
                return value
        except Exception:  # secret absent or notebook access not granted: fall back to the environment
            pass
    return os.environ.get(name) or None


def processes():
    """This process among those `torchrun` or `accelerate launch` started (the only one in a notebook): accelerate's
    `PartialState`, whose `process_index`, `num_processes`, `is_main_process`, `wait_for_everyone()` and
    `main_process_first()` the steps use; without a GPU the processes talk through gloo on the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=PROCESS_WAIT)


def peak_gpu_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
