"""RadEval 2.2.1 as helpers.metrics.clinical runs it: its modules imported under the name its vendored code uses, every
checkpoint resolved offline from a stand-in folder when one is given, each metric group's per-study scorer, and a
finished metric's models freed. radeval's bugs are worked around here, each where it bites (the comment says which).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

from ..core.storage import free_gpu_memory

# Folders under a stand-in root (`model_cache`): a hub cache for the encoders, and the hub caches RadEval passes
# explicitly for CheXbert's and RadGraph's checkpoints.
CACHE_LAYOUT = {"hub": "hub", "chexbert": "chexbert", "radgraph": "radgraph"}
# RadEval 2.2.1's other metrics, and why they are not run. None of its modules imports torchvision (it is only
# listed in its install_requires, and is not installed here: PyPI's build cannot load beside torch 2.13).
LEFT_OUT = {"bleu": "BLEU comes from helpers.metrics.nlg (pycocoevalcap, as R2Gen computes it)",
            "rouge": "ROUGE-L comes from helpers.metrics.nlg (pycocoevalcap)",
            "green": "GREEN comes from helpers.evaluate.green (per region, cached judge answers)",
            "radeval_bertscore": "not among the seed paper's or ReXrank's metrics",
            "srrbert": "not among the seed paper's or ReXrank's metrics",
            "temporal": "not among ReXrank's metrics; imports stanza (not installed)",
            "f1radbert_ct": "for CT reports", "radfact_ct": "for CT reports, through an LLM API",
            "crimson": "an LLM-API judge (OpenAI or Gemini)", "mammo_green": "for mammography, through an LLM API"}


class _RadEvalAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`RadEval.x` is `radeval.x`: radeval 2.2.1's vendored RadGraph imports itself under its repository's name, which
    fails on a case-sensitive file system (jbdel/RadEval#27)."""

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "RadEval":
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("radeval" + spec.name[len("RadEval"):])

    def exec_module(self, module):
        pass  # create_module returned the module already loaded under its real name


def import_radeval(name: str):
    """importlib.import_module for radeval's modules, with the `RadEval` alias in place."""
    if not any(isinstance(finder, _RadEvalAlias) for finder in sys.meta_path):
        # first: the path finder would otherwise load `RadEval.x.y` from the real package's folder a second time
        sys.meta_path.insert(0, _RadEvalAlias())
    return importlib.import_module(name)


@contextmanager
def model_cache(root: str | Path):
    """Every checkpoint RadEval loads resolved offline from `root` (laid out as CACHE_LAYOUT), not the user's caches.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, into `huggingface_hub.constants` (which
    transformers reads at each call too); RadEval fixes its CheXbert and RadGraph cache folders (appdirs) at import
    as well. So these module constants are patched for the block, not the environment.
    """
    from huggingface_hub import constants

    root = Path(root)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(constants, "HF_HUB_CACHE", str(root / CACHE_LAYOUT["hub"])))
        stack.enter_context(mock.patch.object(constants, "HF_HUB_OFFLINE", True))
        for module, key in (("radeval.metrics.f1chexbert.f1chexbert", "chexbert"),
                            ("radeval.metrics.radgraph._vendor.core", "radgraph")):
            try:
                folder = str(root / CACHE_LAYOUT[key])
                stack.enter_context(mock.patch.object(import_radeval(module), "CACHE_DIR", folder))
            except ImportError:
                pass  # that metric cannot run here: `unavailable` says why
        yield root


def _radeval(name: str):
    with warnings.catch_warnings():  # RadEval() would silence every warning of the process for good
        return import_radeval("radeval").RadEval(metrics=[name], per_sample=True, show_progress=False)


def release() -> None:
    """Free a finished metric's models: RadGraph's vendored AllenNLP also keeps every encoder and tokenizer it built."""
    if "radeval.metrics.radgraph._vendor.allennlp.common.cached_transformers" in sys.modules:
        cached = sys.modules["radeval.metrics.radgraph._vendor.allennlp.common.cached_transformers"]
        cached._model_cache.clear()
        cached._tokenizer_cache.clear()
    free_gpu_memory()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _chexbert(pairs):
    # RadEval's CheXbert labeller (rrg mode: 1 = positive), built here: its `f1chexbert` adapter asks for "cuda" on any
    # machine, and the labeller moves there before falling back to the CPU
    labeller = import_radeval("radeval.metrics.f1chexbert.f1chexbert").F1CheXbert(device=_device())
    texts = sorted({*pairs.reference, *pairs.candidate})
    labels = dict(zip(texts, labeller.get_labels(texts)))
    return {"chexbert_reference": [labels[t] for t in pairs.reference],
            "chexbert_candidate": [labels[t] for t in pairs.candidate]}


def _semb(pairs):
    semb = import_radeval("radeval.metrics.RadCliQv1.semb_score")
    return {"SembScore": semb.semantic_embedding_scores(list(pairs.reference), list(pairs.candidate), device=_device())}


def _radgraph(pairs):
    return {"RadGraph F1": _radeval("radgraph")(list(pairs.reference), list(pairs.candidate))["radgraph_partial"]}


def _bertscore(pairs):
    return {"BERTScore": _radeval("bertscore")(list(pairs.reference), list(pairs.candidate))["bertscore"]}


def _radgraph_combined(pairs):
    return {"RadGraph combined": _radeval("radgraph_radcliq")(list(pairs.reference),
                                                              list(pairs.candidate))["radgraph_radcliq"]}


def _bertscore_rexrank(pairs):
    # ReXrank's BERTScore (layer 5: bert-score's default for distilroberta-base); RadEval registers no metric for it
    scorer = import_radeval("radeval.metrics.bertscore.bertscore").BertScore(model_type="distilroberta-base",
                                                                             num_layers=5, idf=False)
    return {"BERTScore distilroberta": scorer(list(pairs.reference), list(pairs.candidate))[1]}


def _ratescore(pairs):
    # RaTEScore drops a text with no sentence (e.g. an empty candidate) from its entity lists, which shifts every
    # later pair; such pairs get the score it gives a pair without entities (0.5) and are not passed to it.
    split = import_radeval("radeval.metrics.RaTEScore.utils").sentence_split
    scored = np.array([bool(split([r])[0]) and bool(split([c])[0]) for r, c in zip(pairs.reference, pairs.candidate)])
    scores = np.full(len(pairs), 0.5)
    if scored.any():
        rate = _radeval("ratescore")
        scores[scored] = rate(list(pairs.reference[scored]), list(pairs.candidate[scored]))["ratescore"]
    return {"RaTEScore": scores}


def _radcliq(pairs):
    # per (system, split): RadCliQ's BERTScore weighs tokens by IDF over the references it is given with them
    radcliq, scores = _radeval("radcliq"), np.full(len(pairs), np.nan)
    for _, part in pairs.groupby(["system", "split"], sort=False):
        scores[part.index] = radcliq(list(part.reference), list(part.candidate))["radcliq_v1"]
    return {"RadCliQ-v1": scores}  # per study, lower is better; the table reports 1 / mean


# Each RadEval metric group run here: the module its scorer lives in (imported to tell whether it can run), its scorer.
SCORERS = {"f1chexbert": ("radeval.metrics.f1chexbert.f1chexbert", _chexbert),
           "semb": ("radeval.metrics.RadCliQv1.semb_score", _semb),
           "radgraph": ("radeval.metrics.radgraph", _radgraph),
           "radgraph_radcliq": ("radeval.metrics.radgraph_radcliq.radgraph_radcliq", _radgraph_combined),
           "bertscore": ("radeval.metrics.bertscore.bertscore", _bertscore),
           "bertscore_rexrank": ("radeval.metrics.bertscore.bertscore", _bertscore_rexrank),
           "ratescore": ("radeval.metrics.RaTEScore.scorer", _ratescore),
           "radcliq": ("radeval.metrics.RadCliQv1.radcliq", _radcliq)}


def unavailable() -> dict[str, str]:
    """{RadEval metric group: why it cannot run here} for the groups whose scorer does not import (the ImportError)."""
    reasons = {}
    for group, (module, _) in SCORERS.items():
        try:
            import_radeval(module)
        except ImportError as e:
            reasons[group] = f"{type(e).__name__}: {e}"
    return reasons
