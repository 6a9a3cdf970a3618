"""The generation target (four region sections) and the prompt, shared by training and generation."""
from __future__ import annotations

import json
import re
from collections import Counter

from .data import REGIONS

HEADERS = {"lung": "Lung", "heart": "Heart", "mediastinal": "Mediastinal", "bone": "Bone"}
INSTRUCTION = ("Write the findings of this chest X-ray study, one line per region in this order: "
               "Lung, Heart, Mediastinal, Bone. Leave a region empty if nothing is reported.")
_SYNONYMS = {
    "lung": "lung", "lungs": "lung", "pulmonary": "lung", "lung fields": "lung",
    "heart": "heart", "cardiac": "heart",
    "mediastinal": "mediastinal", "mediastinum": "mediastinal", "cardiomediastinal": "mediastinal",
    "bone": "bone", "bones": "bone", "bony": "bone", "osseous": "bone", "skeletal": "bone",
}
_EMPTY = {"", "none", "n/a", "na", "-", "none.", "n/a.", "nil", "null"}
_NAMES = "|".join(sorted(_SYNONYMS, key=len, reverse=True))  # longest first: "lung fields" before "lung"
_LINE_START = r"^\s*(?:[-*•]\s*|\d+[.)]\s*|#+\s*)?(?:\*\*|__)?\s*"  # bullet, number or markdown heading, bold
_HEADER = re.compile(_LINE_START + r"(" + _NAMES + r")\s*(?:\*\*|__)?\s*[:\-–]\s*(?:\*\*|__)?", re.IGNORECASE)
_JUNK = re.compile(r"(</s>|<\|[^|]*\|>|\[/?INST\]|<pad>|<unk>|<s>).*$", re.DOTALL)
_LEADING = re.compile(r"^(?:\s*(?:<s>|<pad>|<unk>))+")  # BOS / left padding when decoded with specials
# A region header inside a line ("… clear. Heart: normal"): starts a new line, so one-line answers parse too.
_INLINE = re.compile(r"(?<=[.;])\s+(?=(?:\*\*)?(?:" + _NAMES + r")(?:\*\*)?\s*:)", re.IGNORECASE)
# Another report section ("Impression:", "Others:") ends the current region instead of continuing it.
_OTHER_HEADER = re.compile(_LINE_START + r"(?:others?|impressions?|findings|"
                           r"conclusions?|comparison|indications?|history|technique|recommendations?|notes?)\s*"
                           r"(?:\*\*|__)?\s*:", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def user_message(n_views: int) -> dict:
    """One image placeholder per view, then the instruction (the chat template renders images first anyway)."""
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_views)] + [{"type": "text", "text": INSTRUCTION}]}


def format_report(regions: dict) -> str:
    """`Lung: …\\nHeart: …\\nMediastinal: …\\nBone: …`; an empty region keeps its header; 'others' is dropped."""
    return "\n".join(f"{HEADERS[k]}: {' '.join((regions.get(k) or '').split())}".rstrip() for k in REGIONS)


def _clean(text: str) -> str:
    text = " ".join(text.replace("**", "").replace("__", "").split()).strip(" -*•")
    return "" if text.lower() in _EMPTY else text


def _parse_json(text: str) -> dict | None:
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        return None
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    out = {}
    for key, value in obj.items():
        region = _SYNONYMS.get(str(key).strip().lower())
        if region and region not in out:
            out[region] = _clean(value if isinstance(value, str) else " ".join(map(str, value or [])))
    return out or None


def _answer(text: str) -> str:
    """The answer only: after an echoed prompt, without BOS / padding before or end-of-sequence junk after."""
    return _JUNK.sub("", _LEADING.sub("", text.rsplit("[/INST]", 1)[-1]))


def parse_report(text) -> tuple[dict, bool]:
    """Inverse of `format_report`, tolerant of what models really write; never raises.

    Returns (regions, parsed): the four region keys as strings, and whether any region header (or a
    JSON object with region keys) was found, so parse failures can be counted.
    """
    regions = {k: "" for k in REGIONS}
    if not isinstance(text, str):
        return regions, False
    text = _answer(text)
    found = _parse_json(text)
    if found is not None:
        regions.update(found)
        return regions, True
    current, seen, parsed = None, set(), False
    for line in _INLINE.sub("\n", text).splitlines():
        match = _HEADER.match(line)
        if match:
            parsed = True
            region = _SYNONYMS[match.group(1).lower()]
            current = None if region in seen else region  # a repeated header: the first text wins
            seen.add(region)
            line = line[match.end():]
        elif _OTHER_HEADER.match(line):
            current = None
        if current is not None:
            regions[current] = _clean(f"{regions[current]} {line}")
    return regions, parsed


def degenerate_reasons(text) -> list[str]:
    """Why a generated report is degenerate even where `parse_report` counts it as parsed; [] for a usable one.

    "no region header": nothing `parse_report` recognises (its parse failure); "repeated header": a region header
    occurs more than once (e.g. "Heart:" eight times), counting headers that directly follow one another, which
    `parse_report` reads as text; "no region text": the four regions are all empty; "repeated sentence": a sentence
    occurs three or more times in one region, a generation loop (gold reports repeat one at most twice).
    """
    regions, parsed = parse_report(text)
    headers = Counter()
    for line in _INLINE.sub("\n", _answer(text) if isinstance(text, str) else "").splitlines():
        while match := _HEADER.match(line):
            headers[_SYNONYMS[match.group(1).lower()]] += 1
            line = line[match.end():]
    sentences = Counter((region, s.lower().rstrip(".!?")) for region, t in regions.items()
                        for s in _SENTENCE_END.split(t) if s)  # a loop cut by the token limit ends without a stop
    checks = {"no region header": not parsed, "repeated header": max(headers.values(), default=0) > 1,
              "no region text": not any(regions.values()), "repeated sentence": max(sentences.values(), default=0) > 2}
    return [reason for reason, hit in checks.items() if hit]


REPORT = "report"  # the whole report's name beside the regions, in tables and score frames


def whole_report(regions: dict) -> str:
    """The four regions joined in a fixed order: how whole-findings scores (GREEN, BLEU, ...) see a report."""
    return " ".join(regions[k].strip() for k in REGIONS if regions[k].strip())
