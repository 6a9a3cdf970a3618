"""Checking a region split: against its report (the five keys, every sentence grounded, every report sentence
covered) and against another split of the same reports (presence agreement, ROUGE-L)."""
from __future__ import annotations

import json
import re

from ..core.data import ALL_REGIONS
from .rules import sentences


_STOPWORDS = set("""a an the and or of in on at to with without is are was were be been being there this that these
those for from by as it its which has have had may might can also again both either any some than then into over
upon per seen noted identified present appear appears demonstrated visualized""".split())
# Words the provided splits' rewrite conventions add (e.g. "Cardiac contours are within normal limits.").
_CONVENTION_WORDS = {"cardiac", "mediastinal", "contour", "within", "normal", "limit", "heart", "mediastinum"}
# ... and the report words they replace or drop ("Frontal and lateral views of the chest show a normal
# cardiomediastinal silhouette").
_REWRITTEN_WORDS = {"cardiomediastinal", "cardio", "silhouette", "size", "contour", "configuration", "appearance",
                    "unremarkable", "frontal", "lateral", "view", "chest", "show"}
GROUNDED_FRACTION = 0.75  # share of an output sentence's content words that must occur in the report
COVERED_FRACTION = 0.5  # share of a report sentence's content words that must occur in the output


def content_words(text: str) -> set[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w
            for w in words if w not in _STOPWORDS and w != "xxxx" and (len(w) > 2 or w.isdigit())}


def schema_problems(obj) -> list[str]:
    if not isinstance(obj, dict):
        return [f"output is not a JSON object (got {type(obj).__name__})"]
    problems = [f"missing key '{k}'" for k in ALL_REGIONS if k not in obj]
    problems += [f"unexpected key '{k}'" for k in obj if k not in ALL_REGIONS]
    problems += [f"'{k}' is not a string" for k in ALL_REGIONS if k in obj and not isinstance(obj[k], str)]
    return problems


def validate_split(text: str, regions) -> list[str]:
    """Violations of one split: the five keys; every output sentence grounded in the report; every report
    sentence's content covered by some region. An empty list means valid."""
    problems = schema_problems(regions)
    if problems:
        return problems
    source = content_words(text)
    output = set()
    for region in ALL_REGIONS:
        for sentence in sentences(regions[region]):
            words = content_words(sentence)
            output |= words
            words -= _CONVENTION_WORDS
            if words and len(words & source) / len(words) < GROUNDED_FRACTION:
                problems.append(f"{region}: not grounded in the report: {sentence!r}")
    for sentence in sentences(text):
        words = content_words(sentence) - _REWRITTEN_WORDS
        if words and len(words & output) / len(words) < COVERED_FRACTION:
            problems.append(f"not covered by any region: {sentence!r}")
    return problems


def extract_json_object(text: str):
    """The first JSON object in a model's answer (tolerates prose or code fences around it); None if none."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text or ""):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None



def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (the definition the Task-1 scorer uses)."""
    x, y = re.findall(r"\w+", a.lower()), re.findall(r"\w+", b.lower())
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    return 0.0 if not prev[-1] else 2 * prev[-1] / (len(x) + len(y))


def agreement(reference: dict[str, dict], other: dict[str, dict], regions=ALL_REGIONS) -> dict[str, dict]:
    """Per region over the shared ids: presence agreement (both empty or both not) and mean ROUGE-L
    (1 when both are empty, 0 when only one is)."""
    ids = sorted(set(reference) & set(other))
    out = {}
    for k in regions:
        pairs = [(reference[i][k].strip(), other[i][k].strip()) for i in ids]
        out[k] = {"presence": sum(bool(a) == bool(b) for a, b in pairs) / max(len(ids), 1),
                  "rouge_l": sum(1.0 if not a and not b else rouge_l(a, b) if a and b else 0.0
                                 for a, b in pairs) / max(len(ids), 1),
                  "n": len(ids)}
    return out
