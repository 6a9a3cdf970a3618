"""Notebook 04: GREEN protocol arithmetic, faithfulness to the shipped GREEN class, cache, baselines, notebook run."""
import json
import math

import pytest

from helpers.core import data, report_format, runs, settings
from helpers.model import generation, modeling
from helpers.judge import judge
from helpers.demo import tiny_models
from helpers.evaluate import baselines, green
from helpers.core.data import REGIONS, Study
from helpers.demo.tiny_models import tokenizer_corpus
from helpers.core.storage import JsonlStore

HAND_JUDGE = "hand-written-judge"  # not a model: every pair is in the cache, so loading it would fail the test


def answer(matched: int, errors: dict | None = None) -> str:
    """A judge response in GREEN's output format (as its prompt asks for it)."""
    errors = errors or {}
    names = [s.split(" ", 1)[1] for s in judge.green_scorer().sub_categories]
    significant = "\n".join(f"({c}) {name}: {errors.get(c, 0)}." for c, name in zip("abcdef", names))
    insignificant = "\n".join(f"({c}) {name}: 0." for c, name in zip("abcdef", names))
    return (f"[Explanation]:\nHand-written.\n\n[Clinically Significant Errors]:\n{significant}\n\n"
            f"[Clinically Insignificant Errors]:\n{insignificant}\n\n[Matched Findings]:\n{matched}. finding")


def seed_cache(path, judge_id, responses: dict, engine: str = "static"):
    """Judge answers as `judge.Judge(judge_id, path, engine=engine)` (fp32 on the CPU) caches them: keyed by its
    label."""
    label = judge.judge_label(judge_id, engine=engine)
    JsonlStore(path).append([{"key": judge.judge_key(label, ref, cand), "judge": label, "reference": ref,
                              "candidate": cand, "response": text, "truncated": False}
                             for (ref, cand), text in responses.items()])


def study(i, split, **regions):
    return Study(id=f"s{i}", split=split, regions={**{r: "" for r in REGIONS}, "others": "", **regions},
                 original_report=None)


def test_score_response_uses_green_parser():
    assert judge.score_response(answer(2, {"b": 1})) == {
        "green": 2 / 3, "parsed": True, "errors": {"a": 0, "b": 1, "c": 0, "d": 0, "e": 0, "f": 0}, "matched": 2}
    assert judge.score_response(answer(0))["green"] == 0  # GREEN: no matched finding -> 0, even with no error
    garbage = "lorem ipsum [Matched Findings]"
    assert judge.green_scorer().compute_green(garbage) == 0  # what GREEN itself would average
    assert judge.score_response(garbage)["parsed"] is False and judge.score_response(garbage)["green"] is None


def test_argument_order_reference_first(tmp_path):
    reference, candidate = "Small left pleural effusion.", ""
    prompt = judge.judge_messages(reference, candidate)[0]["value"]
    assert prompt.index("2. Reference Report:") < prompt.index(reference) < prompt.index("3. Candidate Report:")
    swapped = judge.judge_messages(candidate, reference)[0]["value"]
    assert swapped.index("3. Candidate Report:") < swapped.index(reference)
    # the cache holds the judge's answer for (reference, candidate) only: a swapped call would miss it and try to
    # load the (nonexistent) judge model
    seed_cache(tmp_path / "cache.jsonl", HAND_JUDGE, {(reference, candidate): answer(0, {"b": 1}),
                                                         ("", ""): answer(0)})
    hand_judge = judge.Judge(HAND_JUDGE, tmp_path / "cache.jsonl")
    frame = green.evaluate({"model": {"test": {"s0": {"regions": {**{r: "" for r in REGIONS}, "lung": candidate}}}}},
                           {"test": [study(0, "test", lung=reference)]}, hand_judge)
    lung = frame[frame.region == "lung"].iloc[0]
    assert (lung.error_b, lung.error_a, lung.green) == (1, 0, 0)  # a missing finding, not a false one


def test_protocol_arithmetic(tmp_path):
    refs = {"val": [study(0, "val", lung="Effusion.", heart="Cardiomegaly.", bone="Fracture."),
                    study(1, "val", lung="Clear.", heart="", bone=""),
                    study(2, "val", lung="Nodule.", heart="Normal.", bone="")],
            "test": [study(3, "test", lung="Effusion.", heart="Normal.", mediastinal="Wide.")]}
    preds = {"val": {"s0": {"regions": {"lung": "Effusion.", "heart": "", "mediastinal": "", "bone": "Fracture."}},
                     "s1": {"regions": {"lung": "Clear.", "heart": "", "mediastinal": "", "bone": "Old fracture."}},
                     "s2": {"regions": {"lung": "Clear.", "heart": "Normal.", "mediastinal": "", "bone": ""}}},
             "test": {"s3": {"regions": {"lung": "Effusion.", "heart": "Normal.", "mediastinal": "Wide.", "bone": ""}}}}
    responses = {("Effusion.", "Effusion."): answer(1), ("Cardiomegaly.", ""): answer(0, {"b": 1}),
                 ("", ""): answer(0), ("Fracture.", "Fracture."): answer(1),
                 ("Clear.", "Clear."): answer(2, {"d": 1}),  # 2 / 3
                 ("", "Old fracture."): answer(0, {"a": 1}),
                 ("Nodule.", "Clear."): "no format at all",  # unparseable: a failure, not a 0
                 ("Normal.", "Normal."): answer(3, {"a": 1}),  # 3 / 4
                 ("Wide.", "Wide."): answer(1),
                 # whole reports: the regions joined in a fixed order
                 ("Effusion. Cardiomegaly. Fracture.", "Effusion. Fracture."): answer(2, {"b": 1}),  # 2 / 3
                 ("Clear.", "Clear. Old fracture."): answer(1, {"a": 1}), ("Nodule. Normal.", "Clear. Normal."):
                 answer(1, {"a": 1}), ("Effusion. Normal. Wide.", "Effusion. Normal. Wide."): answer(3)}
    seed_cache(tmp_path / "cache.jsonl", HAND_JUDGE, responses)
    frame = green.evaluate({"model": preds}, refs, judge.Judge(HAND_JUDGE, tmp_path / "cache.jsonl"))
    assert len(frame) == 4 * 5  # four regions and the whole report per study
    stats = green.region_stats(frame).set_index(["split", "region"])
    lung, heart, bone = stats.loc[("val", "lung")], stats.loc[("val", "heart")], stats.loc[("val", "bone")]
    assert (lung.ref_nonempty, lung.scored, lung.unparseable) == (3, 2, 1)
    assert lung.green == pytest.approx((1 + 2 / 3) / 2)  # s2 unparseable: excluded, not 0
    assert (heart.ref_nonempty, heart.both_empty, heart.green) == (2, 1, pytest.approx((0 + 3 / 4) / 2))
    assert heart.raw_green == pytest.approx((0 + 0 + 3 / 4) / 3)  # both-empty pair scores 0 in the raw mean
    assert (bone.ref_nonempty, bone.ref_empty_pred, bone.both_empty, bone.green) == (1, 1, 1, 1.0)
    assert bone.raw_green == pytest.approx(1 / 3)
    assert math.isnan(stats.loc[("val", "mediastinal")].green)  # no reference mentions it: n/a, not 0

    table, ci = green.green_tables(frame, green.region_stats(frame), "model", n_boot=200, seed=0)
    assert list(table.index) == ["Validation", "Testing"]
    assert list(table.columns) == ["Lung", "Heart", "Mediastinal", "Bone", "Mean", "Whole report"]
    assert table.loc["Testing"].tolist() == pytest.approx([1, 0.75, 1, float("nan"), float("nan"), 1], nan_ok=True)
    assert table.loc["Validation", "Whole report"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    assert math.isnan(table.loc["Validation", "Mean"])  # a region without references makes the mean n/a
    assert list(ci.columns) == [f"{c} {e}" for c in table.columns for e in ("lo", "hi")]
    assert ci.loc["Validation", "Lung lo"] <= table.loc["Validation", "Lung"] <= ci.loc["Validation", "Lung hi"]
    again = green.green_tables(frame, green.region_stats(frame), "model", n_boot=200, seed=0)[1]
    assert again.equals(ci)  # fixed seed
    assert green.markdown_table(table, ci).splitlines()[0] == "| | Lung | Heart | Mediastinal | Bone | Mean | Whole report |"


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory, sample_studies):
    """The demo's tiny judge, trained on the train split's reports only: val and test reports are unseen."""
    return tiny_models.build_random_judge(tmp_path_factory.mktemp("judge") / "tiny-green-judge",
                                          tokenizer_corpus(data.by_split(sample_studies, "train")))


def unseen_pairs(studies) -> list[tuple[str, str]]:
    """(reference, candidate) pairs the tiny judge was not trained on: the test split's regions, the val split's
    reports and made-up sentences, each against a few others and against nothing."""
    texts = [s.regions[r] for s in data.by_split(studies, "test") for r in REGIONS if s.regions[r]]
    texts += [s.original_report for s in data.by_split(studies, "val")]
    texts += ["Small right pleural effusion.", "Mild cardiomegaly.", "Left lower lobe atelectasis.",
              "Lungs are hyperinflated. No pneumothorax."]
    pairs = [(reference, texts[(i + step) % len(texts)]) for i, reference in enumerate(texts) for step in (0, 1, 5)]
    return pairs + [(texts[0], ""), ("", texts[1]), ("", "")]


def test_green_answer_format_parses_in_few_tokens(tiny_judge):
    """The answer the tiny judge learns: GREEN's strict check parses it, decoding gives it back exactly, and with
    its EOS it fits the demo's judge_max_new_tokens."""
    from green_score.utils import clean_responses

    _, tokenizer = judge.load_judge(str(tiny_judge))
    answer_text = tiny_models.green_answer(1, 3)
    assert judge.score_response(answer_text) == {"green": 3 / 4, "parsed": True, "matched": 3,
                                                 "errors": {"a": 1, "b": 0, "c": 0, "d": 0, "e": 0, "f": 0}}
    prompt = tokenizer(judge.chat_text(tokenizer, "Heart size is normal.", "Mild cardiomegaly."))["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert clean_responses(tokenizer.decode(prompt + answer_ids, skip_special_tokens=True)) == "\n" + answer_text
    assert len(answer_ids) <= settings.PROFILES["demo"]["judge_max_new_tokens"]
    assert len(prompt) + len(answer_ids) < judge.GREEN_MAX_LENGTH
    note = json.loads((tiny_judge / tiny_models.BUILT_NOTE).read_text())["note"]
    assert "GREEN's answer format" in note and "meaningless" in note


@pytest.mark.parametrize("precision, load_in_4bit", [("fp32", False), ("fp16", False), ("bf16", False),
                                                     ("fp16", True)])
def test_tiny_judge_answers_parse_and_differ_on_unseen_pairs(tmp_path, tiny_judge, sample_studies, precision,
                                                             load_in_4bit):
    """Greedy answers of the demo's judge (in its fp32, and as the GPU profiles run it: fp16, bf16, 4-bit) on pairs
    it never saw: GREEN parses nearly all of them, within the demo's answer budget, and their scores differ between
    pairs, as a preference stage needs (what they are is meaningless)."""
    pairs = unseen_pairs(sample_studies)
    records = judge.Judge(str(tiny_judge), tmp_path / "cache.jsonl", load_in_4bit=load_in_4bit,
                          dtype=settings.torch_dtype(precision),
                          max_new_tokens=settings.PROFILES["demo"]["judge_max_new_tokens"]).judge(pairs)
    scores = [judge.score_response(r["response"]) for r in records]
    parsed = [s for s, r in zip(scores, records) if s["parsed"] and not r["truncated"]]
    assert len(parsed) >= 0.9 * len(pairs), [r["response"] for r in records]
    assert len({s["green"] for s in parsed}) >= 2


def test_cache_resume_and_dedupe(tmp_path, tiny_judge, monkeypatch, capsys):
    pairs = [("Lung: clear.", "Lung: effusion."), ("", ""), ("Heart normal.", "Heart big."), ("", ""),
             ("Lung: clear.", "Lung: effusion.")]
    cache = tmp_path / "cache.jsonl"
    real, calls = judge.generate_responses, []

    def killed_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # a kill mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(judge, "generate_responses", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        judge.Judge(str(tiny_judge), cache, batch_size=1, max_new_tokens=4).judge(pairs)
    assert "5 pairs, 3 unique (dedupe saves 2 judge calls), 0 cached, 3 to judge" in capsys.readouterr().out
    assert len(cache.read_text().splitlines()) == 1
    monkeypatch.setattr(judge, "generate_responses", real)
    records = judge.Judge(str(tiny_judge), cache, batch_size=1, max_new_tokens=4).judge(pairs)
    assert "1 cached, 2 to judge" in capsys.readouterr().out
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == 3 and len({r["key"] for r in lines}) == 3  # nothing lost, nothing duplicated
    assert [(r["reference"], r["candidate"]) for r in records] == pairs
    assert records[0] is records[4] and all(r["n_new_tokens"] <= 4 for r in records)
    fresh = judge.Judge(str(tiny_judge), tmp_path / "fresh.jsonl", batch_size=3, max_new_tokens=4).judge(pairs)
    assert [r["response"] for r in fresh] == [r["response"] for r in records]  # resumed == uninterrupted


def test_faithful_to_shipped_green(tmp_path, sample_studies):
    """Same completions and scores as green_score's GREEN class (only batch_encode_plus patched in)."""
    import torch
    from green_score.green import GREEN

    # a small vocabulary and long reports make GREEN's prompt ~1,930 tokens, so its fixed 2,048-token budget leaves
    # ~120 tokens to generate (CPU fp16, as GREEN loads its judge, is slow)
    judge_dir = tiny_models.build_random_judge(tmp_path / "judge", tokenizer_corpus(sample_studies), vocab_size=340,
                                               format_steps=0)
    shipped = GREEN(str(judge_dir), cpu=True, compute_summary_stats=False)
    shipped.tokenizer.batch_encode_plus = shipped.tokenizer.__call__  # removed in transformers 5
    shipped.tokenizer.add_bos_token = True  # BOS and EOS, as under green-score's transformers 4.40 (judge.load_tokenizer)
    shipped.tokenizer.update_post_processor()
    assert shipped.tokenizer.chat_template == judge.CHAT_TEMPLATE
    long_ref = ("Heart size is normal. The mediastinal contour is within normal limits. The lungs are clear without "
                "focal consolidation, effusion or pneumothorax. No acute bony abnormality.")
    long_hyp = ("Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis. No pneumothorax. "
                "Degenerative changes of the thoracic spine are noted. Old healed rib fracture.")
    refs = [long_ref, "", "No pneumothorax. Mild effusion on the left.", long_ref]
    hyps = [long_hyp, "", "No pneumothorax.", long_hyp]
    _, _, scores, _, results = shipped(refs, hyps)  # one batch of 4 (GREEN's batch size is 8)

    ours = judge.Judge(str(judge_dir), tmp_path / "cache.jsonl", dtype=torch.float16, batch_size=2)
    ours.model, ours.tokenizer = judge.load_judge(str(judge_dir), dtype=torch.float16)
    longest = max(len(ours.tokenizer(judge.chat_text(ours.tokenizer, r, h))["input_ids"]) for r, h in zip(refs, hyps))
    ours.max_new_tokens = judge.GREEN_MAX_LENGTH - longest  # GREEN generates up to max_length=2048 in all
    records = ours.judge(list(zip(refs, hyps)))  # other batches (sorted, 2 per batch), duplicate judged once
    assert [r["response"] for r in records] == list(results.green_analysis)
    assert min(r["n_new_tokens"] for r in records) > 50  # a real comparison, not a few tokens
    assert [judge.green_scorer().compute_green(r["response"]) for r in records] == scores
    assert [judge.score_response(r["response"])["parsed"] for r in records] == [
        judge.green_scorer().parse_error_counts(c, "Matched Findings", for_reward=True)[0] is not None
        and judge.green_scorer().parse_error_counts(c, "Clinically Significant Errors", for_reward=True)[0]
        is not None for c in results.green_analysis]


def test_baselines(tmp_path, sample_studies, tiny_model_dir):
    train = data.by_split(sample_studies, "train")
    template = baselines.template_regions(train)
    for region in REGIONS:
        texts = [s.regions[region] for s in train if s.regions[region]]
        assert template[region] and texts.count(template[region]) == max(texts.count(t) for t in texts)
    loads = []

    def load():
        loads.append(1)
        return modeling.load_model_and_processor(str(tiny_model_dir), visual_tokens="base")

    neighbors = baselines.retrieval_neighbors(tmp_path / "nn.json", "tiny", train, train, 3, load)
    assert all(neighbors[s.id]["train_id"] == s.id for s in train)  # each study's nearest is itself
    assert all(n["similarity"] == pytest.approx(1.0, abs=1e-5) for n in neighbors.values())
    test = data.by_split(sample_studies, "test")
    neighbors = baselines.retrieval_neighbors(tmp_path / "nn2.json", "tiny", train, test, 3, load)
    assert baselines.retrieval_neighbors(tmp_path / "nn2.json", "tiny", train, test, 3, load) == neighbors
    assert len(loads) == 2  # the cached neighbours skip the model
    predictions = baselines.retrieval_predictions(train, neighbors)
    by_id = {s.id: s for s in train}
    assert all(p["regions"] == {r: by_id[p["train_id"]].regions[r] for r in REGIONS} for p in predictions.values())


def test_notebook_04_demo(tmp_path, sample_dir, sample_studies, tiny_model_dir, green_judge_dir):
    """Notebook 04 in the demo profile on two runs written here (notebooks 01-03's outputs), with part of the judge
    cache hand-written so the tables and the paired differences hold known numbers; the other pairs (baselines) go to
    the demo's judge (the session's build, the one the notebook would build). METEOR and RadEval: test_demo.py."""
    import pandas as pd

    from helpers.run_notebooks import run_notebook

    artifacts = tmp_path.resolve()
    annotation = json.loads((sample_dir / "annotation.json").read_text())
    train = [e for e in annotation["train"]]
    for i, entry in enumerate(annotation["val"]):  # notebook 01's output: val entries get a region report
        entry["report"] = dict(train[i]["report"])
    (artifacts / "regions").mkdir()
    (artifacts / "regions" / "annotation_with_val.json").write_text(json.dumps(annotation))
    (artifacts / "models").mkdir()
    (artifacts / "models" / "tiny-llava").symlink_to(tiny_model_dir)
    (artifacts / "models" / tiny_models.DEMO_JUDGE_DIR).symlink_to(green_judge_dir)
    references = {"val": {e["id"]: e["report"] for e in annotation["val"]},
                  "test": {e["id"]: e["report"] for e in annotation["test"]}}
    # run "a" repeats each reference and its judge says 1 match, 1 error (GREEN 0.5); run "b" adds a sentence to each
    # non-empty text and its judge says 1 match, no error (GREEN 1): b - a = +0.5 on every scored study
    edits = {"a": (lambda text: text, answer(1, {"a": 1})), "b": (lambda text: text and text + " Extra.", answer(1))}
    responses = {}
    for run, (edit, said) in edits.items():
        for split, refs in references.items():
            lines = [{"id": i, "text": "", "regions": {r: edit(report[r]) for r in REGIONS}, "parsed": True,
                      "n_tokens": 9, "confidence": {r: 0.5 if report[r] else None for r in REGIONS}}
                     for i, report in refs.items()]
            path = runs.Artifacts(artifacts).run(run).predictions(split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
            for line, report in zip(lines, refs.values()):
                texts = [(report[r], line["regions"][r]) for r in REGIONS]
                texts.append((report_format.whole_report(report), report_format.whole_report(line["regions"])))
                responses.update({(ref, cand): said if ref else answer(0) for ref, cand in texts})
    judge_dir = str(artifacts / "models" / tiny_models.DEMO_JUDGE_DIR)
    seed_cache(artifacts / "eval" / "green_cache.jsonl", judge_dir, responses, engine="continuous")  # 04's JUDGE_ENGINE

    run_notebook("04_green_eval.ipynb", artifacts, profile="demo", METEOR=False, CLINICAL=False)

    columns = ["Lung", "Heart", "Mediastinal", "Bone", "Mean", "Whole report"]
    for run, expected in (("a", 0.5), ("b", 1.0)):
        out = runs.Artifacts(artifacts).run(run).eval_dir
        table = pd.read_csv(out / "green_table.csv", index_col=0)
        # the judge's id, precision and engine beside the scores (fp32: the demo's tiny judge on the CPU)
        assert set(table.pop("judge")) == {f"{judge_dir} (fp32, continuous batching)"}
        assert list(table.index) == ["Validation", "Testing"] and list(table.columns) == columns
        for split, name in runs.SPLIT_NAMES.items():
            for region, column in report_format.HEADERS.items():
                if any(report[region] for report in references[split].values()):
                    assert table.loc[name, column] == pytest.approx(expected)
                else:
                    assert math.isnan(table.loc[name, column])
            assert table.loc[name, "Whole report"] == pytest.approx(expected)
        assert pd.read_csv(out / "green_table_ci.csv", index_col=0).shape == (2, 13)
        for split in runs.SPLIT_NAMES:
            pairs = [json.loads(line) for line in (out / f"green_{split}.jsonl").read_text().splitlines()]
            assert len(pairs) == 5 * len(references[split]) and {p["system"] for p in pairs} == {run}
        assert all((out / "plots" / name).stat().st_size > 0 for name in
                   ["error_categories.png", "score_distribution.png", "confidence_vs_errors.png"])
    compare = runs.Artifacts(artifacts).compare_dir
    table = pd.read_csv(compare / "green_compare.csv", index_col=[0, 1])
    assert set(table.index.get_level_values(0)) == {"a", "b", "template", "retrieval"}
    assert table.loc[("b", "Testing"), "Whole report"] == pytest.approx(1.0)
    diff = pd.read_csv(compare / "green_diff.csv")
    scored = diff[diff.studies > 0]
    assert set(diff.run) == {"b"} and set(diff.reference) == {"a"} and len(scored)
    assert scored.difference.to_numpy() == pytest.approx(0.5) and (scored.wins == 1).all() and scored.excludes_0.all()
    assert scored.ci_lo.to_numpy() == pytest.approx(0.5) and scored.ci_hi.to_numpy() == pytest.approx(0.5)
    nlg = pd.read_csv(compare / "nlg.csv")
    assert set(nlg.system) == {"a", "b", "template", "retrieval"} and set(nlg.split) == {"val", "test"}
    assert set(nlg.region) == {*REGIONS, "report"}
    whole_a = nlg[(nlg.system == "a") & (nlg.region == "report")]
    assert whole_a["BLEU-4"].to_numpy() == pytest.approx(1.0) and whole_a["CIDEr"].notna().all()  # a == references
    stats = pd.read_csv(compare / "green_stats.csv")
    assert set(stats.system) == {"a", "b", "template", "retrieval"} and len(stats) == 4 * 2 * 5
    assert (compare / "plots" / "green_per_region.png").stat().st_size > 0


def test_bad_predictions_named(tmp_path, capsys):
    refs = [study(0, "test", lung="Clear."), study(1, "test", lung="Clear.")]
    path = tmp_path / "predictions_test.jsonl"
    path.write_text(json.dumps({"id": "s9", "regions": {r: "" for r in REGIONS}}) + "\n")
    with pytest.raises(data.DataError, match=r"predictions_test.jsonl: study s9 is not in the reference split"):
        generation.load_predictions(path, refs)
    path.write_text(json.dumps({"id": "s0", "regions": {"lung": "Clear."}}) + "\n")
    with pytest.raises(data.DataError, match=r"predictions_test.jsonl: study s0: 'regions' must map"):
        generation.load_predictions(path, refs)
    path.write_text(json.dumps({"id": "s0", "regions": {r: "" for r in REGIONS}}) + "\n")
    rows = green.region_pairs("model", "test", refs, generation.load_predictions(path, refs))
    assert len(rows) == 5 and "1 of 2 studies have no prediction and are not scored: s1" in capsys.readouterr().out


def test_the_judge_label_names_its_precision_and_keys_its_cache(tmp_path):
    """GREEN runs its judge in fp16; a 4-bit or bf16 judge answers differently, so its answers never stand in for
    fp16 ones: the label (table headings, `judge` of each record) and the cache key carry the precision."""
    import torch

    labels = {judge.judge_label("J", four, dtype) for four in (False, True)
              for dtype in (torch.float16, torch.bfloat16)}
    assert labels == {"J (fp16)", "J (bf16)", "J (4-bit nf4, fp16 compute)", "J (4-bit nf4, bf16 compute)"}
    seed_cache(tmp_path / "cache.jsonl", "J", {("a", "b"): answer(1)})
    assert len(judge.Judge("J", tmp_path / "cache.jsonl").judge([("a", "b")])) == 1  # fp32 here: cached
    four_bit = judge.Judge("J", tmp_path / "cache.jsonl", load_in_4bit=True, dtype=torch.float16)
    assert four_bit.label == "J (4-bit nf4, fp16 compute)"
    assert judge.judge_key(four_bit.label, "a", "b") not in four_bit.store  # would be judged anew, not reused


def test_answers_cached_before_prompts_had_bos_are_judged_again(tmp_path):
    """Before cache version 2 the in-process prompts lacked GREEN's BOS (transformers 5): such answers, keyed without the
    version, are not reused."""
    from helpers.core.storage import sha256

    path = tmp_path / "cache.jsonl"
    JsonlStore(path).append([{"key": sha256("J (fp32)", "a", "b"), "judge": "J (fp32)", "reference": "a",
                              "candidate": "b", "response": answer(1)}])
    current = judge.Judge("J", path)
    assert current.label == "J (fp32)" and judge.judge_key(current.label, "a", "b") not in current.store
    seed_cache(path, "J", {("a", "b"): answer(1)})
    assert judge.judge_key(current.label, "a", "b") in judge.Judge("J", path).store
