"""Task 1: split a findings text into lung / heart / mediastinal / bone / others.

Backends: "rules" (offline, deterministic; helpers/splitting/rules.py), "openai" (structured outputs) and "hf" (a local
instruct model). Every output is validated; `split_many` runs a backend over many reports with a resumable cache.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Callable

import openai
import torch

from ..core.errors import OptionError, UserError
from ..core.data import ALL_REGIONS
from ..core.lm import greedy_generate, load_causal_lm
from .validation import extract_json_object, schema_problems, validate_split
from .rules import RULES_VERSION, split_rules
from ..core.settings import get_secret, in_colab
from ..core.storage import JsonlStore, atomic_write_json, run_batches, sha256

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
    if client is None:
        api_key = get_secret("OPENAI_API_KEY")
        if not api_key:
            raise UserError("OPENAI_API_KEY is not set (Colab secrets or the environment); "
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
    """An instruct causal LM and its left-padded tokenizer; 4-bit on a GPU unless load_in_4bit=False."""
    load_in_4bit = torch.cuda.is_available() if load_in_4bit is None else load_in_4bit
    if (model_id, load_in_4bit) not in _HF_LOADED:
        _HF_LOADED[model_id, load_in_4bit] = load_causal_lm(model_id, load_in_4bit=load_in_4bit,
                                                            token=token or get_secret("HF_TOKEN"))
    return _HF_LOADED[model_id, load_in_4bit]


def _hf_splitter(model: str = DEFAULT_HF_MODEL, batch_size: int = 8, max_new_tokens: int = 400,
                 load_in_4bit: bool | None = None) -> Splitter:
    lm, tokenizer = load_hf(model, load_in_4bit)

    def generate(conversations):
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        sequences, prompt_length = greedy_generate(lm, tokenizer, prompts, max_new_tokens, add_special_tokens=False)
        return tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)

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
        raise OptionError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
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
    blank: list[str] = field(default_factory=list)  # ids whose report text is empty: five empty regions, no finding

    def summary(self) -> str:
        n_violating = sum(bool(v) for v in self.violations.values())
        return (f"{len(self.regions)} split ({self.n_cached} from cache, {self.n_new} new), "
                f"{len(self.failures)} failed, {n_violating} with validation violations, {len(self.blank)} blank")


def cache_key(splitter: Splitter, text: str) -> str:
    return sha256(splitter.backend, splitter.model, PROMPT_VERSION, text)


def split_many(reports: dict[str, str], backend: str = "rules", cache_path=None, progress: bool = True,
               **options) -> SplitRun:
    """Split many reports ({id: text}); results are appended to the JSONL cache one batch at a time, so a
    rerun skips what is cached and a killed run resumes with nothing lost or duplicated. Identical texts are
    split once; failures are not cached (a rerun retries them). An empty or blank text is not sent: its five regions
    are empty, and its id is named and counted (`SplitRun.blank`)."""
    splitter = make_splitter(backend, **options)
    store = JsonlStore(cache_path, key_field="key")
    blank = [i for i, text in reports.items() if not text.strip()]
    if blank:
        print(f"WARNING: {len(blank)} report(s) are empty or blank, so all five of their regions are left empty "
              f"(nothing to split, no reference finding to score): {', '.join(blank[:20])}"
              f"{' ...' if len(blank) > 20 else ''}")
    keys = {i: cache_key(splitter, t) for i, t in reports.items() if i not in blank}
    texts = {keys[i]: reports[i] for i in keys}
    failed = {}

    def split_batch(batch_keys):
        records = []
        for key, result in zip(batch_keys, splitter.split_batch([texts[k] for k in batch_keys])):
            if result["regions"] is None:
                failed[key] = result["error"]
            else:
                records.append({"key": key, "backend": splitter.backend, "model": splitter.model,
                                "prompt_version": PROMPT_VERSION, "regions": result["regions"],
                                "violations": result["violations"]})
        return records

    run = SplitRun({}, {}, n_cached=sum(keys[i] in store for i in keys), blank=blank)
    run_batches(store, list(texts), lambda key: key, split_batch, batch_size=splitter.batch_size,
                desc=f"split ({backend})", unit="report", progress=progress)
    for i in reports:
        if i in blank:
            run.regions[i], run.violations[i] = dict.fromkeys(ALL_REGIONS, ""), []
        elif keys[i] in failed:
            run.failures[i] = failed[keys[i]]
        else:
            record = store.get(keys[i])
            run.regions[i], run.violations[i] = record["regions"], record["violations"]
    run.n_new = len(run.regions) - run.n_cached - len(blank)
    return run


def choose_backend(settings, backend: str | None = None, openai_model: str = DEFAULT_OPENAI_MODEL,
                   hf_model: str = DEFAULT_HF_MODEL) -> tuple[str, dict]:
    """(backend, its options): None means "openai" in Colab when OPENAI_API_KEY is set, else "rules" (the demo and
    the commands default to the offline splitter; pass "openai" or "hf" to use one)."""
    if backend is None:
        use_openai = not settings.offline and in_colab() and get_secret("OPENAI_API_KEY") is not None
        backend = "openai" if use_openai else "rules"
    options = {"openai": {"model": openai_model},
               "hf": {"model": hf_model, "load_in_4bit": settings.inference_4bit}}.get(backend, {})
    print(f"backend={backend} {options}  prompt={PROMPT_VERSION}")
    return backend, options


def val_reports(annotation: dict) -> dict[str, str]:
    """The validation reports to split, by study id (val entries carry only their original text)."""
    return {entry["id"]: entry["original_report"] for entry in annotation["val"]}


def write_outputs(artifacts, annotation: dict, split_run: SplitRun) -> list:
    """regions/val_regions.json and regions/annotation_with_val.json, which notebooks 03 and 04 read."""
    atomic_write_json(artifacts.regions_dir / "val_regions.json", split_run.regions)
    atomic_write_json(artifacts.split_annotation, annotation_with_regions(annotation, split_run.regions))
    return [artifacts.regions_dir / "val_regions.json", artifacts.split_annotation]


def annotation_with_regions(annotation: dict, regions: dict[str, dict], split: str = "val") -> dict:
    """A copy of the annotation whose `split` entries get a `report` dict (original text kept)."""
    out = copy.deepcopy(annotation)
    for entry in out[split]:
        if entry["id"] in regions:
            entry["report"] = {k: regions[entry["id"]][k] for k in ALL_REGIONS}
    return out
