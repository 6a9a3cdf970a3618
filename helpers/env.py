"""Secrets and GPU memory figures."""
from __future__ import annotations

import os

from .settings import in_colab


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


def peak_gpu_memory_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
