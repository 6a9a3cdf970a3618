"""The offline region splitter: sentence and clause classification by keyword lexicons, plus the rewrite
conventions of the provided IU X-Ray splits (a "cardiomediastinal" statement gives a heart AND a mediastinal
sentence; compound subjects are split by region; 'XXXX' redactions removed; wording otherwise kept)."""
from __future__ import annotations

import re

from .data import ALL_REGIONS

RULES_VERSION = "rules-v1"  # bump on any change of the rules: it is part of the cache key

# Keyword stems per region. A clause goes to the region of its first anatomical keyword (usually its subject);
# to 'others' only when it names no anatomy ("Surgical clips in the right upper quadrant").
LEXICON = {
    "heart": r"heart|cardiac|cardio(?!mediastinal)|cardiomegaly|pericardial|ventric|atri(?:al|um)|(?:aortic\s)?valve",
    "mediastinal": r"mediastin|\b(?:bi)?hil(?:ar|a)\b|aort|trachea|adenopathy|lymph|\bvascul|paratracheal|thymus|svc|"
                   r"superior vena",
    "bone": r"\bspin(?:e|al)|vertebra|rib(?:s)?\b|\bclavic|\bstern(?:um|al)|sternotomy|shoulder|humer|osse|bon(?:e|y)|"
            r"skelet|spondyl|scolio|kyphos|kyphotic|fracture|osteo|demineraliz|syndesmophyte|degenerative|"
            r"acromioclavicular|glenohumeral|t\d+\b|l\d\b|thoracolumbar|lumbar|cervical",
    "lung": r"lung|pulmonary|pleura|pneumothora|effusion|consolidat|air ?space|atelecta|opacit|infiltrat|"
            r"granulom|nodul|mass(?:es)?\b|emphysem|edema|pneumonia|inflat|hyperexpan|scar|interstiti|costophrenic|"
            r"lobe|lingul|apex|apical|apices|bas(?:e|es|ilar)\b|volume|fibros|copd|bronch|parenchym|hemithora|"
            r"airway|alveol|perihilar|cavit|infectio|aerat|blunting|fissure",
    "others": r"soft tissue|abdom|bowel|hernia|free air|intraperitoneal|subdiaphragmatic|catheter|\bline\b|"
              r"\btube\b|pacemaker|pacer|clips?\b|surgical|breast|device|stent|cholecyst|\bport\b|wire|"
              r"gastric|stomach|colon|liver|spleen|kidney|nipple|axilla|thyroid|neck|diaphragm",
}
_KEYWORD = re.compile("|".join(f"(?P<{k}>{v})" for k, v in LEXICON.items()), re.IGNORECASE)
_CARDIOMED = re.compile(r"(?:the\s+)?(?:cardia?o?[- ]?mediastinal(?:\s+(?:silhouettes?|contours?|shadows?|structures?|"
                        r"borders?|size))*|cardio(?:pulmonary|thymic)(?: mediastinal)? silhouettes?)", re.IGNORECASE)
_NORMAL = re.compile(r"normal|unremarkable", re.IGNORECASE)
_NOT_ONLY_NORMAL = re.compile(r"enlarg|widen|promin|tortu|calcif|cardiomegaly|abnormal|increase|shift|mass|large|"
                              r"otherwise|grossly", re.IGNORECASE)
_PREAMBLE = re.compile(r"^(?:[A-Za-z ]{2,20}:\s*|(?:frontal|pa|ap)(?: and lateral)? (?:views?|radiographs?) "
                       r"of the chest[^.]*?\b(?:show|demonstrate|reveal)s?\s+)", re.IGNORECASE)
# "Given differences in patient rotation, heart size ...": the leading phrase is dropped if it names nothing
_LEADING = re.compile(r"^(?:given|considering|accounting for|allowing for|specifically|compared (?:to|with))"
                      r"\b[^,.]*,\s*", re.IGNORECASE)


def clean(text: str) -> str:
    """Drop 'XXXX' redactions and repeated punctuation; normalize spaces."""
    text = re.sub(r"\blymph X{2,}", "lymph nodes", text)  # the provided splits' reading of this redaction
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
    """The region of the clause's first anatomical keyword; 'others' if it names none."""
    regions = [m.lastgroup for m in _KEYWORD.finditer(clause)]
    anatomical = [r for r in regions if r != "others"]
    return (anatomical or ["others"])[0]


def _sentence(text: str) -> str:
    text = text.strip(" ,;")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


# "<subject list> <verb> <predicate>" and "Normal <subject list>." forms of a compound statement
_VERB = re.compile(r"\s(?:is|are|appears?|remains?|demonstrates?|shows?|were|was|within|unremarkable|normal|stable|"
                   r"unchanged|grossly|otherwise|have|has)\b.*$", re.IGNORECASE)
_ADJECTIVE_FIRST = re.compile(r"^((?:the\s)?(?:(?:normal|stable|unremarkable|unchanged|no)(?:\s|,\s))+)(.*)$",
                              re.IGNORECASE)
_LIST = re.compile(r"(\s*,\s*(?:and\s+|or\s+)?|\s+and\s+|\s+or\s+)", re.IGNORECASE)


def _item_region(item: str, previous: str | None, vascularity: str) -> str | None:
    """The region of one listed structure; None if it names none (it joins its neighbour)."""
    named = re.sub(r"(?i)\bX{2,}|\bthe\b|\bpulmonary\b", "", item).strip()
    if not named:  # 'XXXX', 'the pulmonary XXXX': the redacted structure cannot be placed
        return "others"
    if previous == "heart" and re.match(r"(?i)(?:the\s)?(?:pulmonary\s)?vascula", item):
        return vascularity
    return region_of(item) if _KEYWORD.search(item) else None


def _items(subject: str, vascularity: str = "heart") -> list[tuple[str, str]]:
    """(region, text) per listed structure, merged while the region stays the same."""
    parts = _LIST.split(subject.strip())
    groups = []  # [region, text]
    for i in range(0, len(parts), 2):
        item, sep = parts[i], parts[i - 1] if i else ""
        if not item.strip():
            continue
        region = _item_region(item, groups[-1][0] if groups else None, vascularity)
        if groups and region in (groups[-1][0], None):
            groups[-1][1] += sep + item
        elif groups and groups[-1][0] is None:
            groups[-1] = [region, groups[-1][1] + sep + item]
        else:
            groups.append([region, item])
    # 'Cardiac and mediastinal XXXX': the provided splits read the redacted noun as 'contours'
    return [(r, re.sub(r"(?i)^((?:the\s)?(?:cardiac|mediastinal|hilar))\s+X{2,}$", r"\1 contours", t))
            for r, t in groups]


def split_clauses(sentence: str) -> list[tuple[str, str]] | None:
    """'Heart size normal, stable mediastinal contours.': comma-separated clauses about different regions."""
    parts, groups = re.split(r"(,\s+|(?<!consistent)(?<!compatible)\s+with\s+)", sentence.rstrip(".")), []
    for i in range(0, len(parts), 2):
        clause = parts[i]
        region = region_of(clause) if _KEYWORD.search(clause) and len(clause.split()) > 1 else None
        if groups and (region is None or region == groups[-1][0]):
            groups[-1][1] += parts[i - 1] + clause
        else:
            groups.append([region or "others", clause])
    return [tuple(g) for g in groups] if len(groups) > 1 else None


def _singular(predicate: str) -> str:
    return re.sub(r"^(\s)(are|appear|remain|demonstrate|show|were|have)\b",
                  lambda m: m.group(1) + {"are": "is", "appear": "appears", "remain": "remains", "were": "was",
                                          "have": "has"}.get(m.group(2).lower(), m.group(2) + "s"), predicate)


def split_compound(sentence: str) -> list[tuple[str, str]] | None:
    """A statement about several regions' structures, one sentence per region (None if not that form)."""
    prefix, body, predicate = "", sentence.rstrip("."), ""
    # a missing 'and' is a common typo: "Normal heart size mediastinal contours."
    body = re.sub(r"(?i)\b(heart size|cardiac silhouette)\s+(?=mediastin)", r"\1 and ", body)
    adjective, verb = _ADJECTIVE_FIRST.match(body), _VERB.search(body)
    if adjective:
        prefix, body = adjective.groups()
    elif verb:
        body, predicate = body[:verb.start()], body[verb.start():]
    else:
        return None
    # "Heart size and pulmonary vascularity ...": the provided splits keep the vascularity with the heart, or move it
    # to the mediastinum or the lung, about equally often; after "appear(s) ... normal limits" mostly the mediastinum
    items = _items(body, "mediastinal" if re.search(r"(?i)vascularity$", body.strip()) and re.match(r"(?i)\s+appears?\b.*normal limits", predicate) else "heart")
    if len(items) < 2 or max(len(t.split()) for _, t in items) > 6:  # a list of structures, not a clause
        return None
    head = items[-1][1].split()[1:]  # "Cardiac and mediastinal contours": "cardiac" borrows "contours"
    out = []
    for region, text in items:
        if re.fullmatch(r"(?i)\w+(?:al|ac|ar|ic)", text) and head and region != items[-1][0]:
            text = f"{text} {' '.join(head)}"
        text = re.sub(r"(?i)(silhouette)s$", r"\1", text)  # one silhouette each, as the provided splits write it
        plural = text.split()[-1].lower().endswith("s") and not text.lower().endswith(("us", "is", "ss"))
        out.append((region, prefix + text + (predicate if plural or not predicate else _singular(predicate))))
    return out


def cardiomediastinal(sentence: str) -> list[tuple[str, str]]:
    """The provided splits' convention: one heart sentence and one mediastinal sentence.

    "The cardiomediastinal silhouette is normal (in size and contour)" becomes "Cardiac contours are within
    normal limits." + "Mediastinal contours are within normal limits."; other wordings keep their words with
    'cardiomediastinal' replaced by 'cardiac' / 'mediastinal'.
    """
    match = _CARDIOMED.search(sentence)
    rest = sentence[match.end():]
    plain_normal = _NORMAL.search(rest) and not _NOT_ONLY_NORMAL.search(rest)
    if match.start() == 0 and re.match(r"\s+(?:is|are)\b", rest) and plain_normal:
        return [("heart", "Cardiac contours are within normal limits."),
                ("mediastinal", "Mediastinal contours are within normal limits.")]
    noun = re.sub(r"(?i)^(?:the\s+)?cardi\w*(?:[- ]mediastinal)?\s*", "", match.group(0)) or "contours"
    return [(region, f"{sentence[:match.start()]}{word} {noun}{rest}")
            for region, word in (("heart", "cardiac"), ("mediastinal", "mediastinal"))]


# "The heart and lungs have XXXX XXXX in the interval.": what is said is redacted, so it cannot be placed
_REDACTED_PREDICATE = re.compile(r"\b(?:have|has|is|are|was|were)\s+X{2,}(?:\s+X{2,})+")


def classify(sentence: str) -> list[tuple[str, str]]:
    """(region, sentence) pairs for one input sentence."""
    if _REDACTED_PREDICATE.search(sentence):
        return [("others", sentence)]
    sentence = _PREAMBLE.sub("", sentence)
    leading = _LEADING.match(sentence)
    if leading and not _KEYWORD.search(leading.group(0)):
        sentence = sentence[leading.end():]
    out = []
    for region, part in split_compound(sentence) or split_clauses(sentence) or [(region_of(sentence), sentence)]:
        out += cardiomediastinal(part) if _CARDIOMED.search(part) else [(region, part)]
    return out


def split_rules(text: str) -> dict:
    """The five regions of one findings text (deterministic; no model, no network)."""
    out = {k: [] for k in ALL_REGIONS}
    for sentence in sentences(text):
        for region, part in classify(sentence):
            # 'others' keeps its 'XXXX': those statements could not be placed because of them
            part = _sentence(part if region == "others" else clean(part))
            if part and part not in out[region]:
                out[region].append(part)
    return {k: " ".join(v) for k, v in out.items()}
