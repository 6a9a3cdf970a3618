"""Notebook 03's generation on the tiny random LLaVA-NeXT: batching, determinism, resume, schema, token spans (the
notebook itself: test_demo.py)."""
import json

import pytest

from helpers.core import data, report_format
from helpers.model import attention, modeling
from helpers.core.settings import resolve
from helpers.core import runs
from helpers.model import generation
from helpers.core.data import REGIONS

MAX_VIEWS = 3


@pytest.fixture(scope="module")
def val_studies(sample_studies):
    return data.by_split(sample_studies, "val")


def _views(studies):
    return [data.study_images(s, MAX_VIEWS) for s in studies]


def _generate(model_and_processor, studies, **kwargs):
    model, processor = model_and_processor
    return generation.generate_batch(model, processor, _views(studies), [s.id for s in studies],
                                     max_new_tokens=kwargs.pop("max_new_tokens", 12), **kwargs)


def test_batched_left_padding_equals_one_at_a_time(model_and_processor, val_studies):
    model, processor = model_and_processor
    counts = [len(s.image_paths) for s in val_studies]
    assert len(set(counts)) > 1, "the sample's val studies should mix view counts"
    inputs = modeling.generation_inputs(processor, _views(val_studies))
    mask = inputs["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # padding on the left only
    batched = _generate(model_and_processor, val_studies)
    single = [_generate(model_and_processor, [s])[0] for s in val_studies]
    for b, s in zip(batched, single):
        assert (b["id"], b["text"], b["n_tokens"], b["regions"]) == (s["id"], s["text"], s["n_tokens"], s["regions"])
        for region in REGIONS:
            assert (b["confidence"][region] is None) == (s["confidence"][region] is None)
            if b["confidence"][region] is not None:
                assert b["confidence"][region] == pytest.approx(s["confidence"][region], abs=1e-4)


def test_deterministic_and_beam_search(model_and_processor, val_studies):
    assert _generate(model_and_processor, val_studies[:2]) == _generate(model_and_processor, val_studies[:2])
    first = _generate(model_and_processor, val_studies[:2], num_beams=2, repetition_penalty=1.2)
    again = _generate(model_and_processor, val_studies[:2], num_beams=2, repetition_penalty=1.2)
    assert first == again
    assert all(0 < r["n_tokens"] <= 12 for r in first)


def test_schema(model_and_processor, val_studies):
    record = _generate(model_and_processor, val_studies[:1])[0]
    assert set(record) == {"id", "text", "regions", "parsed", "n_tokens", "confidence"}
    assert record["id"] == val_studies[0].id and isinstance(record["text"], str)
    assert set(record["regions"]) == set(REGIONS) and all(isinstance(v, str) for v in record["regions"].values())
    assert record["parsed"] in (True, False) and isinstance(record["n_tokens"], int)
    assert set(record["confidence"]) == set(REGIONS)
    assert all(c is None or 0 < c <= 1 for c in record["confidence"].values())
    assert json.loads(json.dumps(record)) == record


def test_resume_after_interrupt(model_and_processor, sample_studies, tmp_path, monkeypatch):
    model, processor = model_and_processor
    studies = data.by_split(sample_studies, "test")
    kwargs = dict(max_views=MAX_VIEWS, batch_size=1, max_new_tokens=8)
    reference = generation.generate_split(model, processor, studies, tmp_path / "clean.jsonl", **kwargs)
    assert reference["generated_now"] == len(studies)

    real, calls = generation.generate_batch, []

    def dies_on_third_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the Colab runtime going away mid-run
        return real(*args, **kw)

    path = tmp_path / "predictions_test.jsonl"
    monkeypatch.setattr(generation, "generate_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generation.generate_split(model, processor, studies, path, **kwargs)
    monkeypatch.setattr(generation, "generate_batch", real)
    assert len(path.read_text().splitlines()) == 2
    with open(path, "a") as f:
        f.write('{"id": "torn')  # a kill in the middle of a write
    stats = generation.generate_split(model, processor, studies, path, **kwargs)
    assert (stats["already_done"], stats["generated_now"]) == (2, len(studies) - 2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(s.id for s in studies)  # complete, no duplicates
    clean = generation.load_predictions(tmp_path / "clean.jsonl")
    assert all(r == clean[r["id"]] for r in lines)
    assert generation.generate_split(model, processor, studies, path, **kwargs)["generated_now"] == 0


def test_out_of_memory_halves_the_batch_and_loses_nothing(model_and_processor, sample_studies, tmp_path,
                                                         monkeypatch):
    """A CUDA out-of-memory error (faked: more than 2 studies at once) halves the batch and redoes it."""
    import torch

    model, processor = model_and_processor
    studies = data.by_split(sample_studies, "test") + data.by_split(sample_studies, "val")
    kwargs = dict(max_views=MAX_VIEWS, max_new_tokens=8)
    clean = generation.generate_split(model, processor, studies, tmp_path / "clean.jsonl", batch_size=2, **kwargs)
    real, sizes = generation.generate_batch, []

    def fits_two(model, processor, views, ids, **kw):
        sizes.append(len(ids))
        if len(ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, processor, views, ids, **kw)

    monkeypatch.setattr(generation, "generate_batch", fits_two)
    stats = generation.generate_split(model, processor, studies, tmp_path / "oom.jsonl", batch_size=8, **kwargs)
    assert sizes[:3] == [8, 4, 2] and set(sizes[2:]) == {2} and stats["batch_size"] == 2
    assert stats["generated_now"] == clean["generated_now"] == len(studies)
    ours = generation.load_predictions(tmp_path / "oom.jsonl")
    assert len((tmp_path / "oom.jsonl").read_text().splitlines()) == len(ours) == len(studies)  # each study once
    clean = generation.load_predictions(tmp_path / "clean.jsonl")
    assert {i: r["text"] for i, r in ours.items()} == {i: r["text"] for i, r in clean.items()}

    def never_fits(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(generation, "generate_batch", never_fits)
    with pytest.raises(torch.OutOfMemoryError):  # at batch size 1 there is nothing left to halve
        generation.generate_split(model, processor, studies, tmp_path / "never.jsonl", batch_size=1, **kwargs)


def _line_aligned_ids(tokenizer, text):
    """Token ids with the newline as its own token, as in Mistral's vocabulary (the tiny BPE merges across it)."""
    newline, ids = tokenizer.convert_tokens_to_ids("\n"), []
    for k, line in enumerate(text.split("\n")):
        ids += ([newline] if k else []) + tokenizer(line, add_special_tokens=False).input_ids
    return ids


def test_region_token_indices_match_parsed_sections(model_and_processor, sample_studies):
    tokenizer = model_and_processor[1].tokenizer
    messy = ("**Lungs:** clear, no effusion.\n- Heart: normal size\n  and shape.\nMediastinum: None\n"
             "Bone: intact. <|im_end|> xx")
    inline = "Lung: clear. Heart: normal.\nImpression: nothing acute.\nBone: intact."  # one-line answer, other header
    texts = [report_format.format_report(s.regions) for s in sample_studies if s.regions] + [inline, messy]
    for text in texts:
        ids = _line_aligned_ids(tokenizer, text)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        regions, parsed = report_format.parse_report(decoded)
        assert parsed and regions == report_format.parse_report(text)[0]
        indices = generation.region_token_indices(tokenizer, ids)
        for region in REGIONS:
            span_text = tokenizer.decode([ids[i] for i in indices[region]], skip_special_tokens=True)
            assert " ".join(span_text.replace("**", "").split()) == regions[region], (text, region)
    assert not indices["mediastinal"] and indices["bone"]  # messy: "None" parses as empty, so it has no tokens
    assert generation.region_token_indices(tokenizer, tokenizer('{"lung": "clear"}', add_special_tokens=False)
                                           .input_ids) == {k: [] for k in REGIONS}  # JSON answers get no spans


def test_region_token_indices_with_tokens_across_lines(model_and_processor, sample_studies):
    tokenizer = model_and_processor[1].tokenizer
    for study in sample_studies[:8]:
        text = report_format.format_report(study.regions)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        indices = generation.region_token_indices(tokenizer, ids)
        flat = [i for idx in indices.values() for i in idx]
        assert len(flat) == len(set(flat))  # each token in at most one region
        for region in REGIONS:
            assert bool(indices[region]) == bool(study.regions[region])
            assert indices[region] == sorted(indices[region])
            if indices[region]:  # neither the previous nor the next section's tokens
                later = [i for r in REGIONS[REGIONS.index(region) + 1:] for i in indices[r]]
                assert min(later + [len(ids)]) > max(indices[region])


def test_summarize():
    def record(i, text, regions, parsed=True):
        return {"id": str(i), "text": text, "regions": regions, "parsed": parsed, "n_tokens": 10,
                "confidence": {k: (0.5 if regions[k] else None) for k in REGIONS}}
    normal = {"lung": "clear", "heart": "normal", "mediastinal": "", "bone": ""}
    records = [record(i, "Lung: clear\nHeart: normal", normal) for i in range(3)]
    records.append(record(3, "garbage", {k: "" for k in REGIONS}, parsed=False))
    records.append(record(4, "Heart:\n" * 8, {k: "" for k in REGIONS}))  # parses, but is no report
    references = {"0": {"lung": "clear", "heart": "", "mediastinal": "", "bone": "x"}, "3": None}
    s = generation.summarize(records[:4], references, max_new_tokens=10)
    assert (s["studies"], s["parse_failures"], s["distinct_reports"], s["studies_with_reference"]) == (4, 1, 2, 1)
    assert s["degenerate"] == {"no region header": 1, "no region text": 1}  # the garbage
    assert generation.summarize(records, references)["degenerate"] == {"no region header": 1, "no region text": 2,
                                                                        "repeated header": 1}
    assert list(s["failure_examples"]["id"]) == ["3"]
    assert s["most_frequent"].iloc[0]["count"] == 3 and s["most_frequent"].iloc[0]["share"] == 0.75
    empty = s["empty_regions"]
    assert empty.loc["lung", "generated_empty"] == 0.25 and empty.loc["mediastinal", "generated_empty"] == 1.0
    assert empty.loc["heart", "reference_empty"] == 1.0 and empty.loc["bone", "reference_empty"] == 0.0
    assert empty.loc["lung", "mean_confidence"] == 0.5 and s["hit_max_new_tokens"] == 4


@pytest.fixture(scope="module")
def demo_artifacts(tiny_model_dir, tmp_path_factory):
    """An artifacts dir holding a run laid out like notebook 02's (config.json, adapter/), adapter untrained."""
    from helpers.train import training
    from helpers.core.storage import atomic_write_json

    artifacts = tmp_path_factory.mktemp("artifacts")
    run = runs.Artifacts(artifacts).run("demo")
    config = training.make_config(resolve("demo"), model_id=str(tiny_model_dir), max_length=512, max_views=MAX_VIEWS)
    model, processor = training.load_training_model(config)
    model.save_pretrained(run.adapter_dir)
    processor.save_pretrained(run.adapter_dir)
    atomic_write_json(run.config_path, config)
    return artifacts


def test_4bit_adapter_generation_and_attention(demo_artifacts, val_studies):
    """What a T4 user runs: the trained adapter on a 4-bit base model (bitsandbytes runs on the CPU here)."""
    model, processor, _ = modeling.load_for_inference(runs.Artifacts(demo_artifacts).run("demo"), load_in_4bit=True)
    assert any("4bit" in type(m).__name__ for m in model.modules())
    records = _generate((model, processor), val_studies[:2], max_new_tokens=6)
    assert [r["id"] for r in records] == [s.id for s in val_studies[:2]] and all(r["n_tokens"] for r in records)
    analysis = attention.analyze_study(model, processor, val_studies[0], max_views=MAX_VIEWS, max_new_tokens=6)
    assert analysis["attention"].shape[1] == model.config.text_config.num_hidden_layers
