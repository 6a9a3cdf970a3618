"""Report-level NLG metrics as R2Gen / R2GenGPT report them, and a paired bootstrap of two systems over studies."""
from __future__ import annotations

import math
import re
import shutil
from contextlib import contextmanager

import numpy as np
import pandas as pd
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from ..core.data import REGIONS
from ..core.report_format import REPORT, whole_report

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot be computed here, or None when it can (pycocoevalcap runs it as a Java subprocess)."""
    if shutil.which("java"):
        return None
    return "n/a: no Java (`java` is not on PATH; pycocoevalcap's METEOR runs a Java jar)"


# R2Gen's list markers, replaced in this order: "1. " anywhere, then 2-5 after a sentence, then 2-5 after a space
# (numbers above 5 stay, and so does a "2. " that opens the text)
_LIST_MARKERS = (("1. ", ""), *((f". {n}. ", ". ") for n in range(2, 6)), *((f" {n}. ", ". ") for n in range(2, 6)))
_QUOTES_AND_SLASHES = str.maketrans("", "", "\"/\\'")
# R2Gen's class [.,?;*!%^&_+():-\[\]{}] spelled out: its ":-\[" is the range ':'..'[', which adds < = > @ and A-Z
# (already lower-cased) and leaves "-" out, so hyphens stay, as do digits and # $ ` | ~
_SENTENCE_PUNCTUATION = re.compile(r"[.,?;*!%^&_+()<=>@A-Z:\[\]{}]")
_WHITESPACE = re.compile(r"\s+")


def clean_report_iu_xray(text: str) -> str:
    """An IU X-Ray report cleaned exactly as R2Gen's `Tokenizer.clean_report_iu_xray` (modules/tokenizers.py) cleans
    it before training and scoring (R2GenGPT's `clean_report`, dataset/data_helper.py, is a copy).

    Runs of dots joined (three passes of ".." -> ".", so 16 dots still leave two), list markers removed
    (`_LIST_MARKERS`), stripped, lower-cased, split into sentences at ". ", each sentence rid of " / \\ ' then stripped
    then rid of `_SENTENCE_PUNCTUATION`, and the sentences joined by " . " with a final " .". Quirks kept: a sentence
    left empty stays (R2Gen's filter `!= []` compares a string with a list, so it never drops one), giving a double
    space, as does a character removed between two spaces; "" becomes " ."; a line break does not end a sentence;
    "T11. " loses its "1. " and " 3. " becomes ". " even after a measurement ("4 x 3. " -> "4 x. ").
    """
    for _ in range(3):
        text = text.replace("..", ".")
    for marker, replacement in _LIST_MARKERS:
        text = text.replace(marker, replacement)
    return " . ".join(_SENTENCE_PUNCTUATION.sub("", sentence.translate(_QUOTES_AND_SLASHES).strip())
                      for sentence in text.strip().lower().split(". ")) + " ."


def _scored_text(text: str) -> str:
    # Each whitespace run made one space before cleaning, so a line break ends a sentence as the single space of R2Gen's
    # one-line reports does (not stripped: R2Gen strips after removing list markers, so a final "1. " goes). Collapsed
    # after it too, as R2Gen scores token ids joined by single spaces: ROUGE-L splits on single spaces (a double space
    # would be an empty token) and METEOR talks to Java one line per pair. A text without a word ("", or punctuation
    # only: cleaned to ".") is empty, as R2Gen decodes an empty generation.
    cleaned = " ".join(clean_report_iu_xray(_WHITESPACE.sub(" ", text)).split())
    return cleaned if cleaned.strip(" .") else ""


@contextmanager
def meteor_scorer(enabled: bool = True):
    """One METEOR JVM for a block of calls (10-15 s to load its paraphrase table, ~1 GB resident while it lives),
    stopped at the end of the block even after an error; None when disabled or without Java."""
    if not enabled or meteor_unavailable_reason():
        yield None
        return
    meteor = Meteor()
    try:
        yield meteor
    finally:
        # pycocoevalcap keeps its lock when scoring fails, and its __del__ would then wait on it forever
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()  # free the JVM now, not at garbage collection


def _meteor(meteor, gts: dict, res: dict) -> float:
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (OSError, ValueError) as e:  # Java died or never started: a broken pipe, or an empty line for a score
        meteor.meteor_p.kill()
        raise RuntimeError("METEOR's Java process failed: "
                           f"{meteor.meteor_p.stderr.read().decode(errors='replace')[-1000:]}") from e


def nlg_metrics(references: list[str], hypotheses: list[str], meteor: bool = True) -> dict:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr of hypotheses against one reference each, plus pair counts.

    As R2Gen and R2GenGPT score IU X-Ray: pycocoevalcap's Bleu(4), Meteor(), Rouge() and Cider() on dicts keyed by
    pair index, both sides cleaned by `clean_report_iu_xray` (lower-cased, punctuation stripped, sentences joined by
    " . ") with whitespace collapsed, no PTB tokenizer. Without that cleaning "size." and "size" would differ for BLEU,
    ROUGE-L and CIDEr, and the numbers would not be comparable with their papers'.
    METEOR is None without Java (`meteor_unavailable_reason()` says why) or with `meteor=False` (its JVM takes
    10-15 s to start: too slow for a check after every training stage).
    Empty means without a word once cleaned ("", or punctuation only such as "..." or "1. "). Empty reference: the pair
    is not scored, only counted (pycocoevalcap would give it ROUGE-L 1 but BLEU and CIDEr 0). Empty hypothesis,
    non-empty reference: scored as a miss (as "", not the " ." R2Gen's cleaner makes of it: 0 per pair) and counted.
    No pair left: NaN metrics.
    """
    with meteor_scorer(meteor) as scorer:
        return _scores(references, hypotheses, scorer)


def _scores(references: list[str], hypotheses: list[str], meteor) -> dict:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(ref, hyp) for ref, hyp in zip(map(_scored_text, references), map(_scored_text, hypotheses)) if ref]
    counts = {"pairs": len(pairs), "empty_references": len(references) - len(pairs),
              "empty_hypotheses": sum(not hyp for _, hyp in pairs)}
    scores = {**dict.fromkeys(METRICS, math.nan), "METEOR": None if meteor is None else math.nan}
    if pairs:
        gts = {i: [ref] for i, (ref, _) in enumerate(pairs)}
        res = {i: [hyp] for i, (_, hyp) in enumerate(pairs)}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"BLEU-{n}": float(b) for n, b in enumerate(bleu, 1)})
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if meteor is not None:
            scores["METEOR"] = _meteor(meteor, gts, res)
    return {**scores, **counts}


def nlg_table(systems: dict[str, dict[str, dict]], references: dict[str, list], meteor: bool = True):
    """nlg_metrics per system, split and region, and of the whole report (the four regions joined), one JVM for all.

    `systems`: {system: {split: predictions by study id}}; `references`: {split: studies}. Studies without a
    prediction are left out (notebook 04 names them).
    """
    rows = []
    with meteor_scorer(meteor) as scorer:
        for system, by_split in systems.items():
            for split, predictions in by_split.items():
                scored = [s for s in references[split] if s.id in predictions]
                for region in (*REGIONS, REPORT):
                    texts = [(whole_report(s.regions), whole_report(predictions[s.id]["regions"])) if region == REPORT
                             else (s.regions[region], predictions[s.id]["regions"][region]) for s in scored]
                    rows.append({"system": system, "split": split, "region": region,
                                 **_scores([r for r, _ in texts], [h for _, h in texts], scorer)})
    return pd.DataFrame(rows)


def paired_bootstrap(scores_a, scores_b, n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of system b against system a over studies (higher scores better).

    `scores_a` and `scores_b`: one score per study, aligned by position, NaN where that system's study is not scored;
    only studies scored for both are paired (`studies`; the rest are counted in `unpaired`). Returns the mean
    difference `b_minus_a`, its percentile 95% interval `ci95` (resampling paired studies with replacement), and the
    shares of paired studies where a scores higher (`a_wins`), the same (`ties`, exact equality) or lower (`a_loses`).
    """
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"expected two 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    paired = ~np.isnan(a) & ~np.isnan(b)
    a, b = a[paired], b[paired]
    out = {"studies": len(a), "unpaired": int((~paired).sum())}
    if not len(a):
        return {**out, "mean_a": math.nan, "mean_b": math.nan, "b_minus_a": math.nan, "ci95": (math.nan, math.nan),
                "a_wins": math.nan, "ties": math.nan, "a_loses": math.nan}
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {**out, "mean_a": float(a.mean()), "mean_b": float(b.mean()), "b_minus_a": float(diff.mean()),
            "ci95": (float(low), float(high)), "a_wins": float((a > b).mean()), "ties": float((a == b).mean()),
            "a_loses": float((a < b).mean())}
