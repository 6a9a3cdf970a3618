"""The offline region splitter: sentence and clause classification by keyword lexicons, plus the rewrite
conventions of the provided IU X-Ray splits (a "cardiomediastinal" statement gives a heart AND a mediastinal
sentence, unless the report states the heart on its own; compound subjects are split by region; 'XXXX' redactions
removed; wording otherwise kept)."""
from __future__ import annotations

import re

from ..core.data import ALL_REGIONS

RULES_VERSION = "rules-v2"  # bump on any change of the rules: it is part of the cache key

# Keyword stems per region. A clause goes to the region of its first anatomical keyword (usually its subject);
# to 'others' only when it names no anatomy ("Surgical clips in the right upper quadrant").
LEXICON = {
    "heart": r"heart|(?<!retro)cardiac|cardio(?!mediastinal)|cardiomegaly|pericardial|ventric|atri(?:al|um)|"
             r"(?:aortic\s)?valve",
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
                              r"otherwise|grossly|since|prior|compar", re.IGNORECASE)
_PREAMBLE = re.compile(r"^(?:[A-Za-z ]{2,20}:\s*|(?:frontal|pa|ap)(?: \([^)]*\))?(?: and lateral)? "
                       r"(?:views?|radiographs?) of the chest[^.]*?\b(?:show|demonstrate|reveal)s?\s+(?:an?\s+)?)",
                       re.IGNORECASE)
# "Given differences in patient rotation, heart size ...": the leading phrase is dropped if it names nothing
_LEADING = re.compile(r"^(?:given|considering|accounting for|allowing for|specifically|compared (?:to|with))"
                      r"\b[^,.]*,\s*", re.IGNORECASE)


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


# a device placed in the heart ("catheter tip at the cavoatrial junction") is 'others' in the provided splits
_DEVICE = re.compile(r"catheter|\btip\b|generator|pacemaker|pacer|\bleads\b|\bpicc\b|\bline\b|\btube\b|wire",
                     re.IGNORECASE)


def region_of(clause: str) -> str:
    """The region of the clause's first anatomical keyword; 'others' if it names none or is a device in the heart."""
    regions = [m.lastgroup for m in _KEYWORD.finditer(clause)]
    region = ([r for r in regions if r != "others"] or ["others"])[0]
    return "others" if region == "heart" and _DEVICE.search(clause) else region


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
    if previous == "heart" and re.match(r"(?i)(?:the\s)?(?:pulmonary\s)?vascula", item):  # "heart size and ..."
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
    parts, groups = re.split(r"(,\s+|(?<!consistent)(?<!compatible)\s+with\s+|\s+and\s+(?=(?:the\s+)?cardio))",
                             sentence.rstrip(".")), []
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


# "Heart size and pulmonary vascularity ...": the provided splits keep the vascularity with the heart, move it to
# mediastinal or to lung about equally often, except in this template, where mediastinal is the majority
_VASCULARITY_TO_MEDIASTINAL = re.compile(r"\bvascularity\s+appears?\s+(?:within\s+)?normal limits", re.IGNORECASE)


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
    items = _items(body, "mediastinal" if _VASCULARITY_TO_MEDIASTINAL.search(sentence) else "heart")
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
    normal limits." + "Mediastinal contours are within normal limits."; as the subject with another predicate it
    becomes "cardiac/mediastinal contours" ("Mediastinal contours are enlarged."); other wordings keep their words
    with 'cardiomediastinal' replaced by 'cardiac' / 'mediastinal' ("Stable mediastinal silhouette.").
    """
    match = _CARDIOMED.search(sentence)
    rest = sentence[match.end():]
    subject = re.fullmatch(r"(?i)(?:otherwise,?\s*)?", sentence[:match.start()])
    if subject and re.match(r"\s+(?:is|are|appears?)\b", rest) and _NORMAL.search(rest) \
            and not _NOT_ONLY_NORMAL.search(rest):
        return [("heart", "Cardiac contours are within normal limits."),
                ("mediastinal", "Mediastinal contours are within normal limits.")]
    if subject:
        rest = re.sub(r"^\s+(is|appears)\b", lambda m: " are" if m.group(1) == "is" else " appear", rest)
        return [(region, f"{word} contours{rest}")
                for region, word in (("heart", "Cardiac"), ("mediastinal", "Mediastinal"))]
    noun = re.sub(r"(?i)^(?:the\s+)?cardi\w*(?:[- ]mediastinal)?\s*", "", match.group(0)) or "contours"
    return [(region, f"{sentence[:match.start()]}{word} {noun}{rest}")
            for region, word in (("heart", "cardiac"), ("mediastinal", "mediastinal"))]


# "The heart and lungs have XXXX XXXX in the interval.": what is said is redacted, so it cannot be placed
_REDACTED_PREDICATE = re.compile(r"\b(?:have|has|is|are|was|were)\s+X{2,}(?:\s+X{2,})+")


def classify(sentence: str) -> list[tuple[str, str]]:
    """(region, sentence) pairs for one input sentence; region 'cardiomediastinal' is resolved by split_rules."""
    if _REDACTED_PREDICATE.search(sentence):
        return [("others", sentence)]
    preamble, out = _PREAMBLE.match(sentence), []
    if preamble:  # "... views of the chest with overlying monitor leads show ...": the leads go to 'others'
        sentence = sentence[preamble.end():]
        device = re.search(r"(?i)\bwith\s+(.*?)\s+(?:show|demonstrate|reveal)s?\b", preamble.group(0))
        out += [("others", device.group(1))] if device else []
    leading = _LEADING.match(sentence)
    if leading and not _KEYWORD.search(leading.group(0)):
        sentence = sentence[leading.end():]
    for region, part in split_compound(sentence) or split_clauses(sentence) or [(region_of(sentence), sentence)]:
        out.append(("cardiomediastinal" if _CARDIOMED.search(part) else region, part))
    return out


_HEART_SIZE = re.compile(r"\bheart\s+(?:size|is|appears)|cardiomegaly|cardiac size", re.IGNORECASE)


def split_rules(text: str) -> dict:
    """The five regions of one findings text (deterministic; no model, no network)."""
    out = {k: [] for k in ALL_REGIONS}
    pairs = [pair for sentence in sentences(text) for pair in classify(sentence)]
    # when the report states the heart on its own ("The heart size and cardiomediastinal silhouette are normal."),
    # the provided splits keep the cardiomediastinal statement whole, in mediastinal only
    if any(region == "heart" and _HEART_SIZE.search(part) for region, part in pairs):
        pairs = [("mediastinal" if region == "cardiomediastinal" else region, part) for region, part in pairs]
    pairs = [pair for region, part in pairs
             for pair in (cardiomediastinal(part) if region == "cardiomediastinal" else [(region, part)])]
    for region, part in pairs:
        # 'others' keeps its 'XXXX': those statements could not be placed because of them
        part = _sentence(part if region == "others" else clean(part))
        if part and part not in out[region]:
            out[region].append(part)
    return {k: " ".join(v) for k, v in out.items()}
