"""Where things live (Colab + Drive, or this checkout), secrets, and the GPU's capabilities."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

DRIVE_ROOT = Path("/content/drive/MyDrive/xray-rrg")
REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("colab", "t4", "a100", "demo")


def in_colab() -> bool:
    return "google.colab" in sys.modules


@dataclass
class Paths:
    profile: str
    data_dir: Path
    artifacts_dir: Path


def setup(profile: str, data_dir: str | None = None, artifacts_dir: str | None = None) -> Paths:
    """Resolve the data and artifact folders for a profile; in Colab mount Drive and default to it."""
    if profile not in PROFILES:
        raise ValueError(f"unknown PROFILE {profile!r}; choose one of {PROFILES}")
    if in_colab() and profile != "demo":
        from google.colab import drive

        drive.mount("/content/drive")
        default_data, default_artifacts = DRIVE_ROOT / "data", DRIVE_ROOT / "artifacts"
    elif profile == "demo":
        default_data, default_artifacts = REPO_ROOT / "data" / "sample", REPO_ROOT / "artifacts" / "demo"
    else:
        default_data, default_artifacts = REPO_ROOT / "data", REPO_ROOT / "artifacts"
    paths = Paths(profile, Path(data_dir or default_data).resolve(), Path(artifacts_dir or default_artifacts).resolve())
    if not (paths.data_dir / "annotation.json").is_file():
        raise FileNotFoundError(f"{paths.data_dir / 'annotation.json'} not found: put annotation.json and images/ "
                                f"there (see README, 'Data'), or set DATA_DIR")
    paths.artifacts_dir.mkdir(parents=True, exist_ok=True)
    print(f"profile={profile}  data={paths.data_dir}  artifacts={paths.artifacts_dir}")
    return paths


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


def compute_dtype():
    """bf16 on Ampere or newer, fp16 on older GPUs (T4), fp32 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16


def peak_gpu_memory_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
