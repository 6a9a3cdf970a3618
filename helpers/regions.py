"""Task 1: split a findings text into lung / heart / mediastinal / bone / others.

Backends: "rules" (offline, deterministic; helpers/rules.py), "openai" (structured outputs) and "hf" (a local
instruct model). Every output is validated; `split_many` runs a backend over many reports with a resumable cache.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Callable

from .data import ALL_REGIONS
from .env import get_secret
from .rules import RULES_VERSION, sentences, split_rules
from .storage import JsonlStore, sha256

PROMPT_VERSION = "regions-v1"  # bump on any change of the prompt or few-shot examples: it invalidates the cache
DEFAULT_OPENAI_MODEL = "gpt-4o-2024-08-06"
DEFAULT_HF_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BACKENDS = ("rules", "openai", "hf")

SYSTEM_PROMPT = """You split the findings of a chest X-ray report into anatomical regions.
Regions:
- lung: lungs, pleura (effusion, pneumothorax, pleural thickening), airspace, consolidation, atelectasis, nodules, granulomas, edema, emphysema, lung volumes, pulmonary vasculature stated alone.
- heart: cardiac size and silhouette, cardiomegaly, pericardium.
- mediastinal: mediastinum, hila, aorta, trachea, lymph nodes/adenopathy, central vessels.
- bone: spine, ribs, clavicles, sternum, shoulders, bony/osseous structures, fractures, degenerative changes.
- others: anything else (soft tissues, abdomen, diaphragm, hernia, lines, tubes, devices, surgical clips) and redacted 'XXXX' statements that cannot be placed.
Conventions:
- Copy the report's wording; only drop a leading "There is/There are" or "The" when natural, and drop 'XXXX' redactions. Keep negations. Never invent findings.
- A "cardiomediastinal" statement gives a heart sentence AND a mediastinal sentence, e.g. "The cardiomediastinal silhouette is normal." -> heart "Cardiac contours are within normal limits." and mediastinal "Mediastinal contours are within normal limits."
- Split a sentence that covers several regions into one sentence per region, e.g. "Heart size and mediastinal contours are normal." -> heart "Heart size is normal." and mediastinal "Mediastinal contours are normal."
- Every finding of the report goes to exactly one region (both heart and mediastinal for a cardiomediastinal statement).
- A region with nothing reported is "".
Answer with one JSON object with exactly the keys lung, heart, mediastinal, bone, others (strings)."""

# (report, split): the first is a real IU X-Ray training example with its provided split (CXR2887_IM-1289);
# the others were written for this project to show compound sentences, 'others' and an empty region.
FEW_SHOT = [
    ("The cardiomediastinal silhouette is normal in size and contour. There are a few XXXX opacities in the lung "
     "bases bilaterally. No definitive pneumothorax or pleural effusion. Displaced fracture of the mid one-third of "
     "the right clavicle.",
     {"lung": "There are a few opacities in the lung bases bilaterally. No definitive pneumothorax or pleural effusion.",
      "heart": "Cardiac contours are within normal limits.",
      "mediastinal": "Mediastinal contours are within normal limits.",
      "bone": "Displaced fracture of the mid one-third of the right clavicle.", "others": ""}),
    ("Heart size and mediastinal contours are normal. The lungs are clear. There is no pleural effusion or "
     "pneumothorax. Calcified right hilar lymph nodes. Surgical clips in the right upper quadrant. The XXXX are "
     "unremarkable.",
     {"lung": "The lungs are clear. There is no pleural effusion or pneumothorax.",
      "heart": "Heart size is normal.",
      "mediastinal": "Mediastinal contours are normal. Calcified right hilar lymph nodes.",
      "bone": "", "others": "Surgical clips in the right upper quadrant. The XXXX are unremarkable."}),
    ("Mild cardiomegaly. Tortuous aorta. Low lung volumes with bibasilar atelectasis. Mild degenerative changes of "
     "the thoracic spine.",
     {"lung": "Low lung volumes with bibasilar atelectasis.", "heart": "Mild cardiomegaly.",
      "mediastinal": "Tortuous aorta.", "bone": "Mild degenerative changes of the thoracic spine.", "others": ""}),
]

JSON_SCHEMA = {"type": "object", "properties": {k: {"type": "string"} for k in ALL_REGIONS},
               "required": list(ALL_REGIONS), "additionalProperties": False}
OPENAI_RESPONSE_FORMAT = {"type": "json_schema",
                          "json_schema": {"name": "report_regions", "strict": True, "schema": JSON_SCHEMA}}


class SplitError(RuntimeError):
    """A backend failed on a report (refusal, invalid output, rate limit after retries)."""


def prompt_messages(text: str) -> list[dict]:
    """System prompt, the few-shot examples as chat turns, then the report."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for report, regions in FEW_SHOT:
        messages += [{"role": "user", "content": f"Report: {report}"},
                     {"role": "assistant", "content": json.dumps(regions)}]
    return messages + [{"role": "user", "content": f"Report: {text}"}]


def _feedback(problems: list[str]) -> dict:
    return {"role": "user", "content": "Your answer has these problems:\n- " + "\n- ".join(problems)
            + "\nAnswer again for the same report with the corrected JSON object only."}


# ---------------------------------------------------------------- validation

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


def _check(text: str, answer: str | None) -> tuple[dict | None, list[str]]:
    """(regions or None, problems) of a model's raw answer; regions is None when the output is unusable."""
    obj = extract_json_object(answer)
    if obj is None:
        return None, [f"no JSON object in the answer: {(answer or '')[:200]!r}"]
    problems = schema_problems(obj)
    if problems:
        return None, problems
    regions = {k: " ".join(obj[k].split()) for k in ALL_REGIONS}
    return regions, validate_split(text, regions)


def _result(text: str, answer: str | None, retry: str | None = None) -> dict:
    """What a backend returns per report: {"regions": dict|None, "violations": [...], "error": str|None}.
    The retry's answer replaces the first one unless only the first is usable."""
    regions, problems = _check(text, answer)
    if retry is not None:
        retried = _check(text, retry)
        if retried[0] is not None or regions is None:
            regions, problems = retried
    if regions is None:
        return {"regions": None, "violations": problems, "error": "invalid output: " + "; ".join(problems)}
    return {"regions": regions, "violations": problems, "error": None}


# ---------------------------------------------------------------- backends

@dataclass
class Splitter:
    backend: str
    model: str  # part of the cache key
    batch_size: int
    split_batch: Callable[[list[str]], list[dict]]


def _rules_splitter(batch_size: int = 64) -> Splitter:
    def split_batch(texts):
        out = []
        for text in texts:
            regions = split_rules(text)
            out.append({"regions": regions, "violations": validate_split(text, regions), "error": None})
        return out

    return Splitter("rules", RULES_VERSION, batch_size, split_batch)


def _openai_splitter(model: str = DEFAULT_OPENAI_MODEL, client=None, max_retries: int = 8, timeout: float = 60,
                     batch_size: int = 8) -> Splitter:
    import openai

    if client is None:
        api_key = get_secret("OPENAI_API_KEY")
        if not api_key:
            raise RuntimeError("OPENAI_API_KEY is not set (Colab secrets or the environment); "
                               "set it or use backend='rules'")
        # the client itself retries rate limits, timeouts and 5xx with exponential backoff (honouring Retry-After)
        client = openai.OpenAI(api_key=api_key, max_retries=max_retries, timeout=timeout)

    def ask(messages):
        response = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                  response_format=OPENAI_RESPONSE_FORMAT)
        choice = response.choices[0]
        if choice.message.refusal:
            raise SplitError(f"refused: {choice.message.refusal}")
        if choice.finish_reason != "stop":
            raise SplitError(f"incomplete answer (finish_reason={choice.finish_reason})")
        return choice.message.content

    def split_one(text):
        messages = prompt_messages(text)
        try:
            answer = ask(messages)
            problems = _check(text, answer)[1]
            retry = ask(messages + [{"role": "assistant", "content": answer or ""}, _feedback(problems)]) \
                if problems else None
        except SplitError as e:
            return {"regions": None, "violations": [], "error": str(e)}
        except (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError,
                openai.InternalServerError) as e:
            return {"regions": None, "violations": [], "error": f"{type(e).__name__} after the client's retries"}
        return _result(text, answer, retry)

    return Splitter("openai", model, batch_size, lambda texts: [split_one(t) for t in texts])


_HF_LOADED: dict = {}  # (model id, 4-bit) -> (model, tokenizer): split_regions(..., backend="hf") loads it only once


def load_hf(model_id: str = DEFAULT_HF_MODEL, load_in_4bit: bool | None = None, token: str | None = None):
    """An instruct causal LM and its tokenizer (left padding); 4-bit on a GPU unless load_in_4bit=False."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import load_weights

    load_in_4bit = torch.cuda.is_available() if load_in_4bit is None else load_in_4bit
    if (model_id, load_in_4bit) in _HF_LOADED:
        return _HF_LOADED[model_id, load_in_4bit]
    token = token or get_secret("HF_TOKEN")
    model = load_weights(AutoModelForCausalLM, model_id, load_in_4bit=load_in_4bit, token=token).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_id, token=token)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _HF_LOADED[model_id, load_in_4bit] = model, tokenizer
    return model, tokenizer


def _hf_splitter(model: str = DEFAULT_HF_MODEL, batch_size: int = 8, max_new_tokens: int = 400,
                 load_in_4bit: bool | None = None) -> Splitter:
    import torch

    lm, tokenizer = load_hf(model, load_in_4bit)

    def generate(conversations):
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        with torch.inference_mode():
            out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def split_batch(texts):
        conversations = [prompt_messages(t) for t in texts]
        answers = generate(conversations)
        checks = [_check(t, a) for t, a in zip(texts, answers)]
        again = [i for i, (_, problems) in enumerate(checks) if problems]
        retries = dict(zip(again, generate([conversations[i] + [{"role": "assistant", "content": answers[i]},
                                                                 _feedback(checks[i][1])] for i in again]))) \
            if again else {}
        return [_result(t, a, retries.get(i)) for i, (t, a) in enumerate(zip(texts, answers))]

    return Splitter("hf", model, batch_size, split_batch)


def make_splitter(backend: str = "rules", **options) -> Splitter:
    """options: rules: batch_size; openai: model, client, max_retries, timeout, batch_size;
    hf: model, batch_size, max_new_tokens, load_in_4bit."""
    factories = {"rules": _rules_splitter, "openai": _openai_splitter, "hf": _hf_splitter}
    if backend not in factories:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return factories[backend](**options)


def split_regions(text: str, backend: str = "rules", **options) -> dict:
    """The five regions of one findings text; raises SplitError if the backend fails on it."""
    if backend == "rules":
        return split_rules(text)
    result = make_splitter(backend, **options).split_batch([text])[0]
    if result["regions"] is None:
        raise SplitError(result["error"])
    return result["regions"]


# ---------------------------------------------------------------- batch runs

@dataclass
class SplitRun:
    regions: dict[str, dict]  # id -> five regions, for every study that did not fail
    violations: dict[str, list[str]]  # id -> violations of its (kept) split
    failures: dict[str, str] = field(default_factory=dict)  # id -> why it failed (not cached: a rerun retries it)
    n_cached: int = 0
    n_new: int = 0

    def summary(self) -> str:
        n_violating = sum(bool(v) for v in self.violations.values())
        return (f"{len(self.regions)} split ({self.n_cached} from cache, {self.n_new} new), "
                f"{len(self.failures)} failed, {n_violating} with validation violations")


def cache_key(splitter: Splitter, text: str) -> str:
    return sha256(splitter.backend, splitter.model, PROMPT_VERSION, text)


def split_many(reports: dict[str, str], backend: str = "rules", cache_path=None, progress: bool = True,
               **options) -> SplitRun:
    """Split many reports ({id: text}); results are appended to the JSONL cache one batch at a time, so a
    rerun skips what is cached and a killed run resumes with nothing lost or duplicated."""
    from tqdm.auto import tqdm

    splitter = make_splitter(backend, **options)
    store = JsonlStore(cache_path, key_field="key") if cache_path else None
    done = store.records if store is not None else {}
    keys = {i: cache_key(splitter, t) for i, t in reports.items()}
    todo = list({keys[i]: i for i in reports if keys[i] not in done}.values())  # one call per distinct text
    run = SplitRun({}, {}, n_cached=sum(keys[i] in done for i in reports))
    failed_keys = {}
    with tqdm(total=len(set(keys.values())), initial=len(set(keys.values())) - len(todo), disable=not progress,
              desc=f"split ({backend})") as bar:
        for start in range(0, len(todo), splitter.batch_size):
            chunk = todo[start:start + splitter.batch_size]
            records = []
            for i, result in zip(chunk, splitter.split_batch([reports[i] for i in chunk])):
                if result["regions"] is None:
                    failed_keys[keys[i]] = result["error"]
                    continue
                records.append({"key": keys[i], "backend": splitter.backend, "model": splitter.model,
                                "prompt_version": PROMPT_VERSION, "regions": result["regions"],
                                "violations": result["violations"]})
            if store is not None:
                store.append(records)
            else:
                done.update((r["key"], r) for r in records)
            bar.update(len(chunk))
    for i in reports:
        if keys[i] in failed_keys:
            run.failures[i] = failed_keys[keys[i]]
        else:
            run.regions[i], run.violations[i] = done[keys[i]]["regions"], done[keys[i]]["violations"]
    run.n_new = len(run.regions) - run.n_cached
    return run


def annotation_with_regions(annotation: dict, regions: dict[str, dict], split: str = "val") -> dict:
    """A copy of the annotation whose `split` entries get a `report` dict (original text kept)."""
    out = copy.deepcopy(annotation)
    for entry in out[split]:
        if entry["id"] in regions:
            entry["report"] = {k: regions[entry["id"]][k] for k in ALL_REGIONS}
    return out


# ---------------------------------------------------------------- comparison

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
