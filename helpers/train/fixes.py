"""What TRL 1.16 and transformers 5.23 get wrong for this project's training outside the default Colab image, set
right in one place (helpers.train.training applies it on import and per model).

- torch 2.8 and 2.9 reject TRL's fp32 accumulation of 16-bit products (`torch.addmm(..., out_dtype=torch.float32)`,
  relaxed in torch 2.10 by pytorch#167931), so every SFT and DPO stage crashed at its first backward there: TRL's own
  fallback (`_MM_OUT_DTYPE = False`) is used on those versions.
- TRL runs its fused LM head's Triton kernels on any CUDA GPU, but Triton's support starts at compute capability
  8.0: below it (T4, V100) the head takes TRL's torch path (`settings.fused_head_path` decides, the settings print it).
- transformers' `enable_input_require_grads` adds forward hooks without removing its earlier ones, and TRL's
  DPOTrainer re-enables checkpointing (hence it) at every step: the earlier hooks are removed first.
"""
from __future__ import annotations

import torch
from packaging.version import Version

from ..core.settings import fused_head_path, gpu

# the torch releases whose addmm takes out_dtype but rejects an fp32 `self` with 16-bit inputs
ADDMM_OUT_DTYPE_BROKEN = (Version("2.8.0"), Version("2.10.0"))


def addmm_out_dtype_works(torch_version: str) -> bool:
    """Whether this torch takes TRL's fp32 `addmm` into an fp32 accumulator from 16-bit inputs (2.10 and later)."""
    version = Version(Version(torch_version).base_version)
    return not ADDMM_OUT_DTYPE_BROKEN[0] <= version < ADDMM_OUT_DTYPE_BROKEN[1]


def configure_fused_head(torch_version: str | None = None, compute_capability=None) -> str:
    """Set TRL's fused LM head for this torch and GPU (defaults: the running ones); returns the kernels' path."""
    from trl.kernels import chunked_logprob

    if not addmm_out_dtype_works(torch_version or torch.__version__):
        chunked_logprob._MM_OUT_DTYPE = False  # TRL's own fallback: the product upcast to fp32 before the addmm
    capability = compute_capability if compute_capability is not None else gpu()[2]
    path = fused_head_path(capability)
    if capability is not None and path != "triton":
        chunked_logprob._use_triton = lambda device: False  # TRL's torch tiles on this GPU too
    return path


def one_set_of_input_grad_hooks(model) -> None:
    """Make `model.enable_input_require_grads` remove the hooks its previous call added before adding new ones."""
    enable = model.enable_input_require_grads

    def enable_once():
        model.disable_input_require_grads()  # removes the hooks of the last call (none before the first)
        enable()

    model.enable_input_require_grads = enable_once
