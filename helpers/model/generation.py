"""Notebook 03: batched deterministic generation, per-region token confidence, resumable predictions, summary."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from transformers import LogitsProcessor

from ..core.data import REGIONS, DataError, by_split, load_studies, readable_studies, study_images
from .modeling import generation_inputs
from ..core.report_format import degenerate_reasons, parse_report
from ..core.runs import SPLIT_NAMES
from ..core.settings import peak_gpu_memory_gb, processes
from ..core.storage import JsonlStore, open_store, run_sharded


def token_char_ends(tokenizer, ids: list[int]) -> list[int]:
    """End offset in the decoded text of each token (decoding prefixes: tokenizers give no offsets for decoding)."""
    full = len(tokenizer.decode(ids, skip_special_tokens=True))
    ends, end = [], 0
    for i in range(len(ids)):
        # clamp: a prefix ending inside a multi-byte character decodes to a replacement char
        end = min(full, max(end, len(tokenizer.decode(ids[:i + 1], skip_special_tokens=True))))
        ends.append(end)
    return ends


def region_token_indices(tokenizer, ids: list[int]) -> dict[str, list[int]]:
    """For each region, the indices of the generated tokens that wrote its text (header tokens excluded).

    `parse_report` itself is run on the text growing token by token, so this follows whatever it accepts: a
    token belongs to the one region whose parsed text it extends by at most its own characters, if that text
    is still a prefix of the region's final text. Headers, blank tokens, text that parses as empty ("None"),
    text a later header cuts off, and answers that only parse once complete (JSON) get no region.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    final, _ = parse_report(text)
    out = {k: [] for k in REGIONS}
    before, start = parse_report("")[0], 0
    for i, end in enumerate(token_char_ends(tokenizer, ids)):
        now, _ = parse_report(text[:end])
        changed = [k for k in REGIONS if now[k] != before[k]]
        if len(changed) == 1:
            region = changed[0]
            grown = len(now[region]) - len(before[region])
            if now[region] and 0 < grown <= end - start + 1 and final[region].startswith(now[region]):
                out[region].append(i)  # +1: the space that joins a continuation line
        before, start = now, end
    return out


def default_max_new_tokens(run_config: dict) -> int:
    """1.5x the longest training target (notebook 02 records it): a report much longer is a repetition loop."""
    return round(1.5 * run_config["target_tokens_max"]) if "target_tokens_max" in run_config else 256


def generated_length(model, ids: list[int]) -> int:
    """Tokens up to and including the first end-of-sequence token (the rest is padding of finished rows)."""
    eos = model.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(ids):
        if token in stop_ids:
            return i + 1
    return len(ids)


def generate_batch(model, processor, views: list[list], ids: list[str], *, max_new_tokens: int = 256,
                   num_beams: int = 1, repetition_penalty: float = 1.0) -> list[dict]:
    """One prediction record per study (schema of predictions_{val,test}.jsonl); deterministic decoding only."""
    inputs = generation_inputs(processor, views, model)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                             repetition_penalty=repetition_penalty, return_dict_in_generate=True, output_scores=True)
        # log-probabilities of the chosen tokens under the decoding distribution (beams followed correctly)
        logprobs = model.compute_transition_scores(out.sequences, out.scores, out.get("beam_indices"),
                                                   normalize_logits=True).float().cpu()
    generated = out.sequences[:, -len(out.scores):].cpu().tolist()
    tokenizer = processor.tokenizer
    records = []
    for row, (study_id, token_ids) in enumerate(zip(ids, generated)):
        n = generated_length(model, token_ids)
        token_ids, probs = token_ids[:n], logprobs[row, :n].exp().tolist()
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        regions, parsed = parse_report(text)
        indices = region_token_indices(tokenizer, token_ids)
        confidence = {k: (sum(probs[i] for i in idx) / len(idx) if idx else None) for k, idx in indices.items()}
        records.append({"id": study_id, "text": text, "regions": regions, "parsed": parsed, "n_tokens": n,
                        "confidence": confidence})
    return records


class NonFiniteRows(LogitsProcessor):
    """Marks every row whose next-token distribution is not a distribution (a NaN, +inf, or nothing allowed: an fp16
    overflow on a T4) and gives it uniform scores, so that `multinomial` draws instead of raising for the whole batch;
    the marked rows are dropped afterwards. transformers' `remove_invalid_values` repairs scores without saying which."""

    def __init__(self, prompt_length: int, eos_token_id):
        self.prompt_length, self.rows = prompt_length, None
        self.eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])

    def __call__(self, input_ids, scores):
        bad = scores.isnan().any(-1) | scores.isposinf().any(-1) | scores.isneginf().all(-1)
        finished = torch.isin(input_ids[:, self.prompt_length:], self.eos.to(input_ids.device)).any(-1)
        bad &= ~finished  # a finished row's later scores are never used
        self.rows = bad if self.rows is None else self.rows | bad
        return torch.where(bad[:, None], torch.zeros_like(scores), scores)


def sample_batch(model, processor, views: list[list], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[dict]]:
    """`n` reports per study by temperature sampling (the preference stage's candidates; evaluation stays greedy):
    pure temperature, no top-k or top-p cut, seeded so a batch samples the same reports again. A sample whose
    distribution stopped being finite at some step is left out, so a study can get fewer than `n`."""
    inputs = generation_inputs(processor, views, model)
    guard = NonFiniteRows(inputs["input_ids"].shape[1], model.generation_config.eos_token_id)
    torch.manual_seed(seed)
    with torch.inference_mode():
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                   top_k=0, top_p=1.0, num_return_sequences=n, logits_processor=[guard])
    generated = sequences[:, inputs["input_ids"].shape[1]:].cpu().tolist()  # rows: study 0's n samples, then 1's
    valid = (~guard.rows).tolist() if guard.rows is not None else [True] * len(generated)
    records = []
    for token_ids, ok in zip(generated, valid):
        token_ids = token_ids[:generated_length(model, token_ids)]
        text = processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        regions, parsed = parse_report(text)
        records.append({"text": text, "regions": regions, "parsed": parsed, "n_tokens": len(token_ids)} if ok else None)
    return [[r for r in records[i:i + n] if r is not None] for i in range(0, len(records), n)]


def generate_split(model, processor, studies, out_path: str | Path, *, max_views: int, batch_size: int = 8,
                   max_new_tokens: int = 256, num_beams: int = 1, repetition_penalty: float = 1.0,
                   views=None) -> dict:
    """Generate for every study not yet in `out_path`, appending one batch at a time; returns speed figures.

    `views(study)`: the images to generate from, by default the study's own first `max_views` (the grounding check,
    helpers/evaluate/grounding.py, replaces them).

    `batch_size` is where it starts: it halves on CUDA out-of-memory (the batch is redone, nothing lost). Under
    `torchrun` / `accelerate launch` the batches are spread over the processes (`storage.run_sharded`); the figures
    are then of all processes together.
    """
    store = open_store(out_path, key_field="id")
    # batches of equal view count pad less; output does not depend on the batch (tested)
    ordered = sorted(studies, key=lambda s: min(len(s.image_paths), max_views))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    views = views or (lambda study: study_images(study, max_views))

    def generate(batch):
        return generate_batch(model, processor, [views(s) for s in batch], [s.id for s in batch],
                              max_new_tokens=max_new_tokens, num_beams=num_beams,
                              repetition_penalty=repetition_penalty)

    done_before, start = set(store.records), time.time()
    store, run = run_sharded(store, ordered, lambda s: s.id, generate, batch_size=batch_size,
                             desc=Path(out_path).name, unit="study")
    seconds = round(time.time() - start, 2)
    new = [r for key, r in store.records.items() if key not in done_before]
    generated, tokens = len(new), sum(r["n_tokens"] for r in new)
    return {"file": str(out_path), "studies": len(studies), "generated_now": generated,
            "already_done": len(done_before & {s.id for s in studies}), "seconds": seconds,
            "processes": processes().num_processes, "batch_size": run["batch_size"],
            "studies_per_s": round(generated / seconds, 3) if generated else None,
            "tokens_per_s": round(tokens / seconds, 1) if generated else None, "peak_gpu_memory_gb": peak_gpu_memory_gb()}


def studies_to_generate(data_dir, artifacts, max_views: int) -> tuple[dict[str, list], dict[str, dict]]:
    """({split: readable val / test studies}, {study id: gold regions}); val has regions once notebook 01 ran."""
    split_annotation = artifacts.split_annotation if artifacts.split_annotation.is_file() else None
    studies = load_studies(data_dir, annotation_path=split_annotation, require_images=tuple(SPLIT_NAMES))
    references = {s.id: s.regions for s in studies if s.regions}
    splits = {split: readable_studies(by_split(studies, split), max_views) for split in SPLIT_NAMES}
    for split, items in splits.items():
        print(f"{split}: {len(items)} studies, {sum(s.id in references for s in items)} with a reference")
    return splits, references


def generate_splits(model, processor, splits: dict[str, list], run, **options) -> dict[str, dict]:
    """`generate_split` for each split into the run's predictions_{split}.jsonl; speed figures by split."""
    return {split: generate_split(model, processor, items, run.predictions(split), **options)
            for split, items in splits.items()}


def load_predictions(path: str | Path, references: list | None = None) -> dict[str, dict]:
    """A predictions file by study id; with `references` (the split's studies) every record is checked against them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found: run notebook 03 (python -m helpers generate) for this "
                        f"run first")
    records = JsonlStore(path, key_field="id").records
    known = None if references is None else {s.id for s in references}
    for study_id, record in records.items():
        if known is not None and study_id not in known:
            raise DataError(f"{path}: study {study_id} is not in the reference split")
        regions = record.get("regions")
        if not isinstance(regions, dict) or any(not isinstance(regions.get(k), str) for k in REGIONS):
            raise DataError(f"{path}: study {study_id}: 'regions' must map {list(REGIONS)} to strings")
    return records


def summary_line(split: str, summary: dict) -> str:
    """`summarize`'s counts in one line."""
    return (f"=== {split}: {summary['studies']} studies, {summary['parse_failures']} parse failures, degenerate "
            f"{summary['degenerate'] or 'none'}, {summary['distinct_reports']} distinct reports, "
            f"{summary.get('hit_max_new_tokens', 'n/a')} stopped at max_new_tokens, "
            f"{summary['studies_with_reference']} with a reference")


def summarize(records: list[dict], references: dict[str, dict] | None = None, *, top: int = 5,
              max_new_tokens: int | None = None) -> dict:
    """Parse failures, degenerate outputs, template collapse (distinct reports, most frequent ones) and empty-region
    rates. `degenerate` counts each reason of `report_format.degenerate_reasons` (a text can have several), so outputs that
    parse but are no report (eight "Heart:" headers and nothing else) are reported, not hidden among the parsed.

    `references` maps study id → gold regions; studies without a reference are left out of its column.
    """
    n = len(records)
    failures = pd.DataFrame([{"id": r["id"], "text": r["text"]} for r in records if not r["parsed"]],
                            columns=["id", "text"])
    counts = Counter(" ".join(r["text"].split()) for r in records)
    frequent = pd.DataFrame([{"report": text, "count": c, "share": c / n} for text, c in counts.most_common(top)],
                            columns=["report", "count", "share"])
    references = {k: v for k, v in (references or {}).items() if v}
    with_ref = [r for r in records if r["id"] in references]
    empty = pd.DataFrame({
        "generated_empty": [sum(not r["regions"][k] for r in records) / n if n else None for k in REGIONS],
        "reference_empty": [sum(not references[r["id"]][k] for r in with_ref) / len(with_ref) if with_ref else None
                            for k in REGIONS],
        "mean_confidence": [pd.Series([r["confidence"][k] for r in records], dtype=float).mean() for k in REGIONS],
    }, index=list(REGIONS))
    summary = {"studies": n, "parse_failures": len(failures), "failure_examples": failures.head(top),
               "degenerate": dict(Counter(reason for r in records for reason in degenerate_reasons(r["text"]))),
               "distinct_reports": len(counts), "most_frequent": frequent, "empty_regions": empty,
               "studies_with_reference": len(with_ref)}
    if max_new_tokens:
        summary["hit_max_new_tokens"] = sum(r["n_tokens"] >= max_new_tokens for r in records)
    return summary
