"""The offline region splitter: sentence and clause classification by keyword lexicons, plus the rewrite
conventions of the provided IU X-Ray splits (a "cardiomediastinal" statement gives a heart AND a mediastinal
sentence; compound subjects are split by region; 'XXXX' redactions removed; wording otherwise kept)."""
from __future__ import annotations

import re

from .data import ALL_REGIONS

# Keyword stems per region; a clause goes to the region whose keyword appears first (its subject, usually).
LEXICON = {
    "heart": r"heart|cardiac|cardio(?!mediastinal)|cardiomegaly|pericardial|ventric|atri(?:al|um)",
    "mediastinal": r"mediastin|hil(?:ar|um|a)\b|aort|trachea|adenopathy|lymph|vascular calcification|"
                   r"paratracheal|azygos|thymus|svc|superior vena",
    "bone": r"spin(?:e|al)|vertebra|rib(?:s)?\b|clavic|stern(?:um|al)|shoulder|humer|osseous|bon(?:e|y)|skelet|"
            r"spondyl|scolio|kyphosis|kyphotic|fracture|osteo|demineraliz|syndesmophyte|degenerative|"
            r"sternotomy|acromioclavicular|glenohumeral|t\d+\b|l\d\b|thoracolumbar|dextroscoliosis|levoscoliosis|"
            r"lumbar|cervical",
    "lung": r"lung|pulmonary|pleura|pneumothora|effusion|consolidat|air ?space|atelecta|opacit|infiltrat|"
            r"granulom|nodul|mass(?:es)?\b|emphysem|edema|pneumonia|hyperinflat|hyperexpan|hypoinflat|scar|"
            r"interstiti|costophrenic|lobe|lingul|apex|apical|apices|bas(?:e|es|ilar)\b|bibasilar|volume|fibros|"
            r"copd|bronch|parenchym|hemithora|airway|alveol|vascular(?:ity|ature)|perihilar|cavit|"
            r"infectio|aerat|inflat|blunting|fissure",
    "others": r"soft tissue|abdom|bowel|hernia|free air|intraperitoneal|subdiaphragmatic|catheter|\bline\b|"
              r"\btube\b|pacemaker|pacer|clips?\b|surgical|breast|device|stent|cholecyst|\bport\b|wire|"
              r"gastric|stomach|colon|liver|spleen|kidney|nipple|axilla|thyroid|neck|diaphragm",
}
_KEYWORD = re.compile("|".join(f"(?P<{k}>{v})" for k, v in LEXICON.items()), re.IGNORECASE)
_CARDIOMED = re.compile(r"(?:the\s+)?cardia?o?[- ]?mediastinal(?:\s+(?:silhouettes?|contours?|shadows?|structures?|"
                        r"borders?|size))*", re.IGNORECASE)
_NORMAL = re.compile(r"normal|unremarkable|stable|unchanged|unaltered", re.IGNORECASE)
_ABNORMAL = re.compile(r"enlarg|widen|promin|tortu|calcif|cardiomegaly|abnormal|increase|shift|mass|large", re.IGNORECASE)
_PREAMBLE = re.compile(r"^(?:[A-Za-z ]{2,20}:\s*|(?:frontal|pa|ap) and lateral (?:views|radiographs) of the chest "
                       r"(?:show|demonstrate|reveal)s?\s+)", re.IGNORECASE)


def clean(text: str) -> str:
    """Drop 'XXXX' redactions and repeated punctuation; normalize spaces."""
    text = re.sub(r"\bX{2,}\b", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r",\s*(?=[,.])", "", text)
    text = re.sub(r"\.{2,}", ".", text)
    return " ".join(text.split())


def sentences(text: str) -> list[str]:
    """Sentences ending in a period; a period between digits (1.5 cm) does not end one."""
    parts = re.split(r"(?<=[.!?;])\s+(?=\S)|(?<=[a-z]\.)(?=[A-Z])", text)
    return [p.strip() for p in parts if p.strip(" .;,")]


def region_of(clause: str) -> str:
    match = _KEYWORD.search(clause)
    return match.lastgroup if match else "others"


def _sentence(text: str) -> str:
    text = text.strip(" ,;")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


# "<subject list> <verb> <predicate>" and "Normal <subject list>." forms of a compound statement
_VERB = re.compile(r"\s(?:is|are|appears?|remains?|demonstrates?|shows?|were|was|within|unremarkable|normal|stable|"
                   r"unchanged|grossly|otherwise|have|has)\b.*$", re.IGNORECASE)
_ADJECTIVE_FIRST = re.compile(r"^((?:the\s)?(?:normal|stable|unremarkable|unchanged)\s)(.*)$", re.IGNORECASE)
_LIST = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+", re.IGNORECASE)


def _items(subject: str) -> list[tuple[str, str]]:
    """(region, text) per list item, merged while the region stays the same; a redacted item is 'others'."""
    groups = []
    for item in filter(None, _LIST.split(subject.strip())):
        region = "others" if re.search(r"X{2,}$", item) else region_of(item)
        if groups and groups[-1][0] == region:
            groups[-1][1].append(item)
        else:
            groups.append((region, [item]))
    return [(r, " and ".join(words)) for r, words in groups]


def _singular(predicate: str) -> str:
    return re.sub(r"^(\s)(are|appear|remain|demonstrate|show|were|have)\b",
                  lambda m: m.group(1) + {"are": "is", "appear": "appears", "remain": "remains", "were": "was",
                                          "have": "has"}.get(m.group(2).lower(), m.group(2) + "s"), predicate)


def split_compound(sentence: str) -> list[tuple[str, str]] | None:
    """A statement about several regions' structures, one sentence per region (None if not that form)."""
    prefix, body, predicate = "", sentence.rstrip("."), ""
    verb = _VERB.search(body)
    if verb:
        body, predicate = body[:verb.start()], body[verb.start():]
    else:
        adjective = _ADJECTIVE_FIRST.match(body)
        if not adjective:
            return None
        prefix, body = adjective.groups()
    items = _items(body)
    if len(items) < 2 or "others" in [r for r, _ in items[:-1]] and len(items) < 3:
        return None
    head = items[-1][1].split()[1:]  # "Cardiac and mediastinal contours": "cardiac" borrows "contours"
    out = []
    for region, text in items:
        if len(text.split()) == 1 and head and region != items[-1][0]:
            text = f"{text} {' '.join(head)}"
        plural = text.split()[-1].lower().endswith("s") and not text.lower().endswith(("us", "is", "ss"))
        out.append((region, prefix + text + (predicate if plural or not predicate else _singular(predicate))))
    return out


def cardiomediastinal(sentence: str) -> list[tuple[str, str]]:
    """The provided splits' convention: one heart sentence and one mediastinal sentence ('contours')."""
    rest = _CARDIOMED.sub("", sentence, count=1)
    if _NORMAL.search(rest) and not _ABNORMAL.search(rest):
        return [("heart", "Cardiac contours are within normal limits."),
                ("mediastinal", "Mediastinal contours are within normal limits.")]
    return [(region, _CARDIOMED.sub(f"{word} contours", sentence, count=1))
            for region, word in (("heart", "cardiac"), ("mediastinal", "mediastinal"))]


def classify(sentence: str) -> list[tuple[str, str]]:
    """(region, sentence) pairs for one input sentence."""
    sentence = _PREAMBLE.sub("", sentence)
    out = []
    for region, part in split_compound(sentence) or [(region_of(sentence), sentence)]:
        out += cardiomediastinal(part) if _CARDIOMED.search(part) else [(region, part)]
    return out


def split_rules(text: str) -> dict:
    """The five regions of one findings text (deterministic; no model, no network)."""
    out = {k: [] for k in ALL_REGIONS}
    for sentence in sentences(text):
        for region, part in classify(sentence):
            part = _sentence(clean(part))
            if part and part not in out[region]:
                out[region].append(part)
    return {k: " ".join(v) for k, v in out.items()}
