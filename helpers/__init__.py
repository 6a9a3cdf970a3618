"""Notebook-facing API. Submodules mirror the notebooks; heavy ones (torch) load only when first used."""
from importlib import import_module

from .data import ALL_REGIONS, REGIONS, DataError, Study, by_split, load_studies, readable_studies, study_images
from .env import get_secret
from .settings import PROFILES, Settings, in_colab, pick_profile, setup
from .reports import format_report, parse_report

__all__ = ["ALL_REGIONS", "REGIONS", "DataError", "Study", "by_split", "load_studies", "readable_studies",
           "study_images", "get_secret", "in_colab", "setup", "pick_profile", "PROFILES", "Settings", "format_report", "parse_report"]

_LAZY = {
    # notebook 01
    "split_regions": "regions", "split_many": "regions", "validate_split": "regions",
    # notebook 02
    "build_tiny_llava": "modeling", "load_model_and_processor": "modeling", "load_for_inference": "modeling",
    "visual_tokens_per_view": "modeling",
    # notebooks 02-04: each module is imported on first use
    "regions": "regions", "modeling": "modeling", "training": "training", "generation": "generation",
    "attention": "attention", "green": "green",
    # notebook 04
    "baselines": "baselines",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    module = import_module(f".{_LAZY[name]}", __name__)
    return module if _LAZY[name] == name else getattr(module, name)
