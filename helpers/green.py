"""Notebook 04: GREEN per region with green-score 0.0.12's own prompt and parser, run by a cached, batched judge loop.

green-score's `GREEN.__call__` cannot run on transformers 5 (`tokenizer.batch_encode_plus` is gone) and generates up to
2,048 tokens per pair without caching, so the judge model is run here; the prompt (`make_prompt`), the chat wrapping,
the decoding clean-up (`clean_responses`) and the scoring (`GREEN.compute_green`, `parse_error_counts`) are its own.
"""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

from .data import REGIONS, DataError
from .storage import JsonlStore, run_batches, sha256

DEFAULT_JUDGE = "StanfordAIMI/GREEN-RadLlama2-7b"
GREEN_MAX_LENGTH = 2048  # GREEN truncates prompts to this many tokens (and stops generating there)
ERROR_CATEGORIES = ("a", "b", "c", "d", "e", "f")  # GREEN's clinically significant error types, in its order
# GREEN sets this template on its tokenizer inside GREEN.__init__ (a local variable there, not importable);
# a test checks that it equals what the shipped class sets.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['from'] == 'human' %}\n{{ '<|user|>\n' + message['value'] + "
    "eos_token }}\n{% elif message['from'] == 'system' %}\n{{ '<|system|>\n' + message['value'] + eos_token }}\n"
    "{% elif message['from'] == 'gpt' %}\n{{ '<|assistant|>\n'  + message['value'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@lru_cache(maxsize=1)
def green_scorer():
    """The shipped GREEN class without a model: its parser and score (`compute_summary_stats` off: no downloads)."""
    from green_score.green import GREEN

    return GREEN(model_name=None, cpu=True, compute_summary_stats=False)


def judge_messages(reference: str, candidate: str) -> list[dict]:
    """GREEN's conversation for one pair: its prompt (reference first) and the empty assistant turn it appends."""
    from green_score.utils import make_prompt

    return [{"from": "human", "value": make_prompt(reference, candidate)}, {"from": "gpt", "value": ""}]


def judge_key(judge_id: str, reference: str, candidate: str) -> str:
    return sha256(judge_id, reference, candidate)


def score_response(response: str) -> dict:
    """GREEN's score and error counts for one judge response.

    A response lacking GREEN's "[Clinically Significant Errors]" or "[Matched Findings]" section is unparseable:
    GREEN's own strict check (`for_reward=True`) returns None for it, while its `compute_green` would score it 0.
    Such pairs get green=None and are counted as failures, never averaged as 0.
    """
    green = green_scorer()
    parsed = all(green.parse_error_counts(response, category, for_reward=True)[0] is not None
                 for category in (green.categories[0], green.categories[2]))
    counts = green.compute_error_count(response)  # six significant error counts, then matched findings
    return {"green": green.compute_green(response) if parsed else None, "parsed": parsed,
            "errors": dict(zip(ERROR_CATEGORIES, counts[:6])), "matched": counts[6]}


def load_judge(model_id: str = DEFAULT_JUDGE, *, load_in_4bit: bool = False, dtype=None, token: str | None = None):
    """The judge model and a tokenizer set up exactly as GREEN.__init__ does (EOS appended, left padding, its template).

    GREEN always loads fp16; here the dtype follows the GPU (bf16 on Ampere+, fp16 on T4) or 4-bit.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import load_weights

    # GREEN's choices: remote code for every judge but Phi; the tokenizer always with remote code
    model = load_weights(AutoModelForCausalLM, model_id, load_in_4bit=load_in_4bit, dtype=dtype, token=token,
                         trust_remote_code="Phi" not in model_id).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_id, add_eos_token=True, use_fast=True, trust_remote_code=True,
                                              padding_side="left", token=token)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = True
    return model, tokenizer


def chat_text(tokenizer, reference: str, candidate: str) -> str:
    return tokenizer.apply_chat_template(judge_messages(reference, candidate), tokenize=False,
                                         add_generation_prompt=True)


def generate_responses(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy judge responses for one left-padded batch, decoded and cleaned as GREEN.get_response does."""
    import torch
    from green_score.utils import clean_responses

    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                      max_length=GREEN_MAX_LENGTH).to(model.device)
    # GREEN stops at max_length=2048 tokens in all; the bound here is tighter unless the prompt is very long
    max_new_tokens = min(max_new_tokens, GREEN_MAX_LENGTH - batch["input_ids"].shape[1])
    with torch.inference_mode():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None)
    # GREEN decodes prompt + answer and cuts at the last "<|assistant|>" (clean_responses); so does this
    decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
    results = []
    for row, text in zip(out[:, batch["input_ids"].shape[1]:].tolist(), decoded):
        ended = tokenizer.eos_token_id in row
        results.append({"response": clean_responses(text),
                        "n_new_tokens": row.index(tokenizer.eos_token_id) + 1 if ended else len(row),
                        "truncated": not ended})
    return results


class Judge:
    """GREEN judgments behind an append-only cache keyed by sha256(judge id, reference, candidate).

    The model loads only when some pair is not cached yet, so a finished evaluation reruns without a GPU.
    """

    def __init__(self, model_id: str, cache_path: str | Path, *, load_in_4bit: bool = False, dtype=None,
                 token: str | None = None, batch_size: int = 8, max_new_tokens: int = 512):
        self.model_id, self.load_in_4bit, self.dtype, self.token = model_id, load_in_4bit, dtype, token
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.store = JsonlStore(cache_path, key_field="key")
        self.model = self.tokenizer = None

    def judge(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """One cached record per (reference, candidate) pair, in order; identical pairs are judged once.

        Batches start at `batch_size` and halve on CUDA out-of-memory (the batch is redone, nothing lost).
        """
        keys = [judge_key(self.model_id, reference, candidate) for reference, candidate in pairs]
        unique = dict(zip(keys, pairs))
        todo = [key for key in unique if key not in self.store]
        print(f"judge {self.model_id}: {len(pairs)} pairs, {len(unique)} unique (dedupe saves "
              f"{len(pairs) - len(unique)} judge calls), {len(unique) - len(todo)} cached, {len(todo)} to judge")
        if todo:
            if self.model is None:
                self.model, self.tokenizer = load_judge(self.model_id, load_in_4bit=self.load_in_4bit,
                                                        dtype=self.dtype, token=self.token)
            texts = {key: chat_text(self.tokenizer, *unique[key]) for key in todo}
            lengths = {key: len(ids) for key, ids in zip(todo, self.tokenizer(list(texts.values()))["input_ids"])}
            # longest first: batches pad little, and an out-of-memory error shows in the first batch
            todo.sort(key=lambda key: -lengths[key])

            def judge_batch(batch):
                start = time.time()
                results = generate_responses(self.model, self.tokenizer, [texts[k] for k in batch], self.max_new_tokens)
                seconds = (time.time() - start) / len(batch)
                return [{"key": key, "judge": self.model_id, "reference": unique[key][0], "candidate": unique[key][1],
                         "max_new_tokens": self.max_new_tokens, "seconds": round(seconds, 3), **result}
                        for key, result in zip(batch, results)]

            run = run_batches(self.store, todo, lambda key: key, judge_batch, batch_size=self.batch_size,
                              desc="GREEN judge", unit="pair")
            self.batch_size = run["batch_size"]  # what fitted: the next call starts there
        return [self.store.get(key) for key in keys]


def build_tiny_judge(out_dir: str | Path, texts: list[str], *, vocab_size: int = 420, seed: int = 0) -> Path:
    """Save a random-weight Llama judge with a Llama tokenizer (BPE + byte fallback) trained offline; idempotent.

    The tokenizer learns GREEN's prompt and answer format plus `texts`; a small vocabulary keeps the prompt long in
    tokens, so GREEN's fixed 2,048-token limit leaves few tokens to generate. Outputs are meaningless.
    """
    import json

    import torch
    from green_score.utils import make_prompt
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    green = green_scorer()
    answer = "\n".join(["[Explanation]:", *(f"[{c}]:" for c in green.categories), *green.sub_categories, "<|assistant|>"])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]  # Llama's byte-fallback tokens
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator([make_prompt("", ""), answer, *texts],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                               add_bos_token=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=GREEN_MAX_LENGTH,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.5)  # large weights: clear argmax margins, so fp16 greedy is stable
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "TINY_RANDOM_JUDGE.json").write_text(json.dumps(
        {"note": "random weights, built offline by helpers.green.build_tiny_judge; judgments are meaningless",
         "seed": seed, "vocab_size": len(tokenizer)}, indent=2))
    return out_dir


# ---- protocol: pairs per region, scores, tables ----
SPLIT_NAMES = {"val": "Validation", "test": "Testing"}
COLUMNS = {"lung": "Lung", "heart": "Heart", "mediastinal": "Mediastinal", "bone": "Bone"}
PROTOCOL = ("Headline: per region, the mean GREEN over the studies whose reference for that region is non-empty. "
            "Raw mean: over all studies (GREEN's compute_green returns 0 whenever the judge counts 0 matched "
            "findings, so a both-empty pair scores 0 when its answer parses). Unparseable judge answers are failures: "
            "counted, never averaged. 'others' is never scored. Mean column: mean of the four region means.")


def load_predictions(path: str | Path, references: list) -> dict[str, dict]:
    """Predictions by study id (notebook 03's schema), checked against the reference studies of the same split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found (run notebook 03 first)")
    known = {s.id for s in references}
    records = JsonlStore(path, key_field="id").records
    for study_id, record in records.items():
        if study_id not in known:
            raise DataError(f"{path}: study {study_id} is not in the reference split")
        regions = record.get("regions")
        if not isinstance(regions, dict) or any(not isinstance(regions.get(k), str) for k in REGIONS):
            raise DataError(f"{path}: study {study_id}: 'regions' must map {list(REGIONS)} to strings")
    return records


def region_pairs(system: str, split: str, references: list, predictions: dict[str, dict]) -> list[dict]:
    """One row per (study, region): reference and candidate text; studies without a prediction are named once."""
    rows, missing = [], []
    for study in references:
        if study.regions is None:
            raise DataError(f"{split} study {study.id} has no region report: use notebook 01's annotation_with_val.json")
        prediction = predictions.get(study.id)
        if prediction is None:
            missing.append(study.id)
            continue
        confidence = prediction.get("confidence") or {}
        for region in REGIONS:
            rows.append({"system": system, "split": split, "id": study.id, "region": region,
                         "reference": study.regions[region], "candidate": prediction["regions"][region],
                         "confidence": confidence.get(region)})
    if missing:
        print(f"WARNING {system}/{split}: {len(missing)} of {len(references)} studies have no prediction and are "
              f"not scored: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}")
    return rows


def find_run(artifacts_dir: str | Path, run: str | None) -> str:
    """The generation run to evaluate: `run`, or the only folder of `generate/` holding predictions."""
    root = Path(artifacts_dir) / "generate"
    runs = sorted(p.parent.name for p in root.glob("*/predictions_val.jsonl"))
    if run is None and len(runs) == 1:
        return runs[0]
    if run is None or run not in runs:
        raise DataError(f"{root}: no predictions for run {run!r}; runs with predictions: {runs} (set RUN_NAME)")
    return run


def evaluate(systems: dict[str, dict[str, dict]], references: dict[str, list], judge: Judge):
    """Judge every (reference, candidate) pair of every system and split at once (dedupe across systems too).

    `systems`: {system: {split: predictions by study id}}; `references`: {split: studies}.
    """
    rows = [row for system, by_split in systems.items() for split, predictions in by_split.items()
            for row in region_pairs(system, split, references[split], predictions)]
    records = judge.judge([(row["reference"], row["candidate"]) for row in rows])
    return judged_frame(rows, records)


def judged_frame(rows: list[dict], records: list[dict]):
    """Rows joined with their judge records and GREEN's parse of each answer: one line per (system, split, study, region)."""
    import pandas as pd

    out = []
    for row, record in zip(rows, records):
        score = score_response(record["response"])
        out.append({**row, "key": record["key"], "response": record["response"], "truncated": record["truncated"],
                    "green": float("nan") if score["green"] is None else float(score["green"]), "parsed": score["parsed"], "matched": score["matched"],
                    **{f"error_{c}": n for c, n in score["errors"].items()},
                    "ref_empty": not row["reference"], "both_empty": not row["reference"] and not row["candidate"],
                    "ref_empty_pred": not row["reference"] and bool(row["candidate"])})
    return pd.DataFrame(out)


def region_stats(frame):
    """Per system, split and region: the headline and raw means, and every count the protocol reports."""
    import pandas as pd

    stats = []
    for (system, split, region), g in frame.groupby(["system", "split", "region"], sort=False):
        headline = g[~g.ref_empty]
        stats.append({"system": system, "split": split, "region": region, "studies": len(g),
                      "ref_nonempty": len(headline), "scored": int(headline.parsed.sum()),
                      "green": headline.green.mean(), "raw_green": g.green.mean(), "raw_scored": int(g.parsed.sum()),
                      "both_empty": int(g.both_empty.sum()), "ref_empty_pred": int(g.ref_empty_pred.sum()),
                      "unparseable": int((~g.parsed).sum()), "unparseable_headline": int((~headline.parsed).sum()),
                      "truncated": int(g.truncated.sum())})
    return pd.DataFrame(stats)


def _headline_matrix(frame):
    """Studies x regions of headline scores; NaN where the reference is empty or the answer did not parse."""
    scores = frame.green.where(~frame.ref_empty & frame.parsed).astype(float)
    return frame.assign(score=scores).pivot(index="id", columns="region", values="score").reindex(columns=list(REGIONS))


def _region_means(matrix):
    import numpy as np

    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(matrix, axis=-2) / (~np.isnan(matrix)).sum(axis=-2)


def bootstrap_ci(frame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Percentile 95% intervals of the headline means, resampling studies (all four regions together)."""
    import numpy as np

    matrix = _headline_matrix(frame).to_numpy()
    rng = np.random.default_rng(seed)
    samples = _region_means(matrix[rng.integers(0, len(matrix), size=(n_boot, len(matrix)))])  # n_boot x 4
    columns = [COLUMNS[r] for r in REGIONS] + ["Mean"]
    samples = np.column_stack([samples, samples.mean(axis=1)])
    out = {}
    for i, column in enumerate(columns):
        values = samples[:, i][~np.isnan(samples[:, i])]
        out[column] = tuple(np.percentile(values, [2.5, 97.5])) if len(values) else (np.nan, np.nan)
    return out


def green_tables(frame, stats, system: str = "model", n_boot: int = 1000, seed: int = 0):
    """(table, ci) of one system: index Validation/Testing; columns Lung, Heart, Mediastinal, Bone, Mean.

    Mean is the mean of the four region means (n/a if a region has none); ci has columns `<column> lo/hi`.
    """
    import pandas as pd

    mine = stats[stats.system == system]
    table = mine.pivot(index="split", columns="region", values="green").reindex(
        index=[s for s in SPLIT_NAMES if s in set(mine.split)], columns=list(REGIONS))
    table["Mean"] = table.mean(axis=1, skipna=False)
    table = table.rename(index=SPLIT_NAMES, columns=COLUMNS).rename_axis(index=None, columns=None)
    ci = {SPLIT_NAMES[split]: {f"{c} {end}": v for c, bounds in bootstrap_ci(
              frame[(frame.system == system) & (frame.split == split)], n_boot, seed).items()
              for end, v in zip(("lo", "hi"), bounds)}
          for split in SPLIT_NAMES if split in set(mine.split)}
    return table, pd.DataFrame.from_dict(ci, orient="index")


def markdown_table(table, ci=None, digits: int = 3) -> str:
    """A README-ready markdown table (pandas' to_markdown needs tabulate, not worth a dependency)."""
    import math

    def cell(row, column):
        value = table.loc[row, column]
        if math.isnan(value):
            return "n/a"
        if ci is None:
            return f"{value:.{digits}f}"
        return f"{value:.{digits}f} [{ci.loc[row, f'{column} lo']:.{digits}f}, {ci.loc[row, f'{column} hi']:.{digits}f}]"

    lines = ["| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(row, c) for c in table.columns) + " |" for row in table.index]
    return "\n".join(lines)


def write_outputs(frame, stats, tables: dict, out_dir: str | Path) -> list[Path]:
    """Everything notebook 04 reports, written atomically from the cache (a rerun rewrites the same files).

    green_table.csv / green_table_ci.csv: the model; green_{val,test}.jsonl: its per-pair judgments;
    green_stats.csv: protocol counts of every system; green_table_systems.csv and baseline_green_{val,test}.jsonl:
    the baselines.
    """
    import pandas as pd

    from .storage import atomic_write_text

    out_dir = Path(out_dir)
    files = {"green_table.csv": tables["model"][0].to_csv(), "green_table_ci.csv": tables["model"][1].to_csv(),
             "green_stats.csv": stats.to_csv(index=False),
             "green_table_systems.csv": pd.concat({k: t for k, (t, _) in tables.items()}, names=["system", "split"]).to_csv()}
    for split in SPLIT_NAMES:
        part = frame[frame.split == split]
        files[f"green_{split}.jsonl"] = part[part.system == "model"].to_json(orient="records", lines=True, force_ascii=False)
        files[f"baseline_green_{split}.jsonl"] = part[part.system != "model"].to_json(orient="records", lines=True,
                                                                                      force_ascii=False)
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / name for name in files]


# ---- plots (inline in the notebook, saved as PNG) ----
def _save(fig, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_region_scores(tables: dict, path):
    """Headline GREEN per region with bootstrap 95% CIs, one bar per system; `tables`: {system: (table, ci)}."""
    import numpy as np

    splits = list(next(iter(tables.values()))[0].index)
    fig, axes = _split_axes(len(splits))
    columns = list(COLUMNS.values()) + ["Mean"]
    width = 0.8 / len(tables)
    for ax, split in zip(axes[0], splits):
        for i, (system, (table, ci)) in enumerate(tables.items()):
            means = table.loc[split, columns].to_numpy(float)
            lo = means - ci.loc[split, [f"{c} lo" for c in columns]].to_numpy(float)
            hi = ci.loc[split, [f"{c} hi" for c in columns]].to_numpy(float) - means
            ax.bar(np.arange(len(columns)) + i * width, means, width, yerr=[lo, hi], capsize=3, label=system)
        ax.set_xticks(np.arange(len(columns)) + width * (len(tables) - 1) / 2, columns)
        ax.set_title(f"{split}: GREEN (reference non-empty), 95% CI")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean GREEN")
    axes[0][0].legend()
    return _save(fig, path)


def _headline_pairs(frame, system: str):
    """The system's parsed pairs with a non-empty reference, and the splits present."""
    return (frame[(frame.system == system) & ~frame.ref_empty & frame.parsed],
            [s for s in SPLIT_NAMES if s in set(frame.split)])


def _split_axes(n_splits: int):
    import matplotlib.pyplot as plt

    return plt.subplots(1, n_splits, figsize=(6 * n_splits, 3.5), squeeze=False, sharey=True)


def plot_error_categories(frame, path, system: str = "model"):
    """Mean count of each clinically significant error type (a)-(f) per region, over scored headline pairs."""
    import numpy as np

    scored, splits = _headline_pairs(frame, system)
    fig, axes = _split_axes(len(splits))
    green = green_scorer()
    width = 0.8 / len(REGIONS)
    for ax, split in zip(axes[0], splits):
        part = scored[scored.split == split]
        for i, region in enumerate(REGIONS):
            counts = part[part.region == region][[f"error_{c}" for c in ERROR_CATEGORIES]].mean()
            ax.bar(np.arange(6) + i * width, counts.to_numpy(float), width, label=COLUMNS[region])
        ax.set_xticks(np.arange(6) + width * 1.5, [s.split(" ", 1)[1][:22] for s in green.sub_categories],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{SPLIT_NAMES[split]}: significant errors per pair ({len(part)} scored pairs)")
    axes[0][0].set_ylabel("mean count")
    axes[0][0].legend()
    return _save(fig, path)


def plot_score_distribution(frame, path, system: str = "model"):
    """Histogram of per-pair GREEN (headline pairs) per region."""
    import numpy as np

    scored, splits = _headline_pairs(frame, system)
    fig, axes = _split_axes(len(splits))
    for ax, split in zip(axes[0], splits):
        part = scored[scored.split == split]
        for region in REGIONS:
            ax.hist(part[part.region == region].green, bins=np.linspace(0, 1, 11), histtype="step", linewidth=1.5,
                    label=COLUMNS[region])
        ax.set_title(f"{SPLIT_NAMES[split]}: GREEN per pair")
        ax.set_xlabel("GREEN")
    axes[0][0].set_ylabel("pairs")
    axes[0][0].legend()
    return _save(fig, path)


def confidence_vs_errors(frame, system: str = "model"):
    """Per region: mean token probability of pairs with and without a false finding (a), and their counts."""
    import pandas as pd

    scored = frame[(frame.system == system) & frame.parsed & frame.confidence.notna()]
    rows = []
    for region in REGIONS:
        part = scored[scored.region == region]
        false = part.error_a > 0
        rows.append({"region": COLUMNS[region], "pairs": len(part), "with_false_finding": int(false.sum()),
                     "confidence_with": part.confidence[false].mean(), "confidence_without": part.confidence[~false].mean()})
    return pd.DataFrame(rows).set_index("region")


def plot_confidence(frame, path, system: str = "model"):
    """Token probability of each region (notebook 03) against GREEN and against false findings (a)."""
    import matplotlib.pyplot as plt

    scored = frame[(frame.system == system) & frame.parsed & frame.confidence.notna()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    for region in REGIONS:
        part = scored[scored.region == region]
        left.scatter(part.confidence, part.green, s=12, alpha=0.6, label=COLUMNS[region])
    left.set_xlabel("mean token probability of the region")
    left.set_ylabel("GREEN")
    left.legend()
    groups = [scored.confidence[scored.error_a == 0], scored.confidence[scored.error_a > 0]]
    right.boxplot([g.to_numpy(float) for g in groups])
    right.set_xticks([1, 2], [f"no false finding (n={len(groups[0])})", f"false finding (n={len(groups[1])})"])
    right.set_ylabel("mean token probability")
    right.set_title("Do false findings come with lower token probability?")
    return _save(fig, path)
