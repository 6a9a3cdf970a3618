"""Notebook 02's data: the held-out slice for model selection, the training conversations, the token budget."""
from __future__ import annotations

import statistics

from datasets import Dataset

from ..core.data import by_split, image_size, load_studies, open_image, readable_studies
from ..model.families import end_of_turn
from ..model.modeling import image_tokens_per_view
from ..core.report_format import format_report, user_message
from ..core.storage import sha256


def holdout_split(studies, fraction: float = 0.05, min_count: int = 2):
    """(train, holdout) from the train split only; a study's side depends on its id alone, so reruns agree."""
    wrong = [s.id for s in studies if s.split != "train"]
    if wrong:
        raise ValueError(f"model selection uses a slice of the train split only; got non-train studies {wrong[:5]}")
    ranked = sorted(studies, key=lambda s: sha256("holdout", s.id))
    held = {s.id for s in ranked[:max(min_count, round(len(studies) * fraction))]}
    return [s for s in studies if s.id not in held], [s for s in studies if s.id in held]


def training_studies(data_dir, max_views: int, holdout_fraction: float = 0.05):
    """(studies to train on, held-out slice): the train split's studies whose images read, cut by `holdout_split`."""
    train_split = readable_studies(by_split(load_studies(data_dir, require_images="train"), "train"), max_views)
    fit, held = holdout_split(train_split, holdout_fraction)
    print(f"train split: {len(train_split)} readable studies -> {len(fit)} to train on, {len(held)} held out for "
          f"model selection")
    return fit, held


def conversation(study, max_views: int) -> list[dict]:
    """The training conversation: the shared user turn, then the four-region target."""
    target = format_report(study.regions)
    return [user_message(len(study.image_paths[:max_views])),
            {"role": "assistant", "content": [{"type": "text", "text": target}]}]


def training_text(study, max_views: int, processor) -> dict:
    """A row's text, in the form the processor's own chat template trains in (`modeling.trl_training_template`):
    `messages`, whose labels TRL's training template marks (assistant-only loss), or a `prompt` string, the
    generation prompt exactly, and a `completion` string, the report and the template's end of turn
    (completion-only loss). The processor must carry the training template (`modeling.training_chat_template`)."""
    messages = conversation(study, max_views)
    if processor.trl_template:
        return {"messages": messages}
    return {"prompt": processor.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False),
            "completion": messages[1]["content"][0]["text"] + end_of_turn(processor)}


def build_dataset(studies, max_views: int, processor):
    """`training_text` + `images`: the table holds each view's path and study, and reading a row decodes its views
    with `open_image`, so training sees the pixels generation sees (a 16-bit PNG scaled, not clipped) and memory stays
    flat. TRL's vision collator needs only PIL images under `images`, not an Image feature."""
    rows = [{**training_text(s, max_views, processor),
             "images": [{"path": str(p), "study": s.id} for p in s.image_paths[:max_views]]} for s in studies]
    return Dataset.from_list(rows).with_transform(_open_views)


def preference_dataset(pairs: list[dict], studies_by_id: dict, max_views: int):
    """TRL's vision preference rows: the training prompt (the shared user turn) with the study's views, the chosen and
    the rejected report as assistant turns; views decoded when a row is read, as in `build_dataset`."""
    def reply(text):
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    rows = []
    for pair in pairs:
        study = studies_by_id[pair["id"]]
        rows.append({"prompt": [user_message(len(study.image_paths[:max_views]))], "chosen": reply(pair["chosen"]),
                     "rejected": reply(pair["rejected"]),
                     "images": [{"path": str(p), "study": study.id} for p in study.image_paths[:max_views]]})
    return Dataset.from_list(rows).with_transform(_open_views)


def _open_views(batch: dict) -> dict:
    return {**batch, "images": [[open_image(v["path"], v["study"]) for v in views] for views in batch["images"]]}


def token_counts(studies, processor, max_views: int) -> list[dict]:
    """Per study: image tokens (from each view's size), text tokens and their total, as the trainer will see them.

    Decodes no image (`data.image_size`), so it is fast on the full data set. `processor` must carry the training
    template.
    """
    image_token = processor.image_token_ids[0]  # the positions features fill (Gemma 3: not its <start_of_image>)
    counts = []
    for study in studies:
        paths = study.image_paths[:max_views]
        image_tokens = sum(image_tokens_per_view(processor, *image_size(p, study.id), len(paths)) for p in paths)
        row = training_text(study, max_views, processor)
        if "messages" in row:  # the labels: the report and the end-of-turn token TRL's template marks with it
            text = processor.apply_chat_template(row["messages"], tokenize=False)
            target = format_report(study.regions) + processor.tokenizer.eos_token
        else:
            text, target = row["prompt"] + row["completion"], row["completion"]
        ids = processor.tokenizer(text, add_special_tokens=False).input_ids
        text_tokens = sum(1 for i in ids if i != image_token)
        counts.append({"id": study.id, "image_tokens": image_tokens, "text_tokens": text_tokens,
                       "target_tokens": len(processor.tokenizer(target, add_special_tokens=False).input_ids),
                       "total": image_tokens + text_tokens})
    return counts


def token_budget(studies, processor, max_views: int) -> dict:
    """`max_length` (the longest study, so image tokens are never truncated) and the longest target, which
    `make_config` records; the distributions are printed."""
    counts = token_counts(studies, processor, max_views)
    for key in ("image_tokens", "text_tokens", "target_tokens", "total"):
        print(f"{key:>13}: {describe([c[key] for c in counts])}")
    longest = max(counts, key=lambda c: c["total"])
    print(f"max_length = {longest['total']} (longest study: {longest['id']})")
    return {"max_length": longest["total"], "target_tokens_max": max(c["target_tokens"] for c in counts)}


def describe(values: list[int]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"n={len(ordered)} min={ordered[0]} median={statistics.median(ordered):g} p95={p95} "
            f"max={ordered[-1]}")
