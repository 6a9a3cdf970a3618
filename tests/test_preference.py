"""The preference stage (two_stage_dpo): rewards and pairs from a judge cache with known scores; the stage starts from
the stage-2 weights with the stage-2 adapter as its frozen reference; a kill in any phase resumes with nothing lost or
duplicated; the computed cost table."""
import json
import math

import pytest
import torch
from peft.utils import load_peft_weights
from transformers import TrainerCallback
from trl.trainer.utils import use_adapter

from helpers.core import data, runs, storage
from helpers.model import families, modeling
from helpers.judge import judge
from helpers.train import preference, preference_stage, recipe, training
from helpers.core.settings import resolve

DEMO = resolve("demo")
JUDGE_ID = "no-such-judge"  # never loaded: every pair below is in the cache


def green_answer(matched: int, false_findings: int) -> str:
    """A judge answer in GREEN's format: GREEN = matched / (matched + significant errors)."""
    return (f"[Explanation]:\nx\n\n[Clinically Significant Errors]:\n(a) False report of a finding in the candidate: "
            f"{false_findings}.\n(b) Missing a finding present in the reference: 0.\n\n"
            f"[Clinically Insignificant Errors]:\nNo errors.\n\n[Matched Findings]:\n{matched}. x")


def seeded_judge(tmp_path, scores: dict) -> judge.Judge:
    """A Judge whose cache holds an answer for each (reference, candidate): scores[pair] = (matched, false) or None
    for an answer GREEN cannot parse."""
    green = judge.Judge(JUDGE_ID, tmp_path / "green_cache.jsonl")
    store = storage.JsonlStore(tmp_path / "green_cache.jsonl", "key")
    store.append([{"key": judge.judge_key(green.label, *pair), "judge": green.label, "reference": pair[0],
                   "candidate": pair[1], "truncated": False,
                   "response": "I cannot tell." if counts is None else green_answer(*counts)}
                  for pair, counts in scores.items()])
    return judge.Judge(JUDGE_ID, tmp_path / "green_cache.jsonl")


def study(study_id, **regions):
    return data.Study(id=study_id, split="train", regions={**dict.fromkeys(data.ALL_REGIONS, ""), **regions},
                      original_report=None)


def candidate(**regions):
    regions = {**dict.fromkeys(data.REGIONS, ""), **regions}
    return {"text": " ".join(f"{k}: {v}" for k, v in regions.items() if v), "regions": regions}


def test_rewards_and_pairs_from_a_seeded_judge_cache(tmp_path):
    a = study("a", lung="Lungs are clear.", mediastinal="Normal mediastinum.")
    b = study("b", lung="No effusion.")
    scores = {("Lungs are clear.", "Lungs are clear."): (2, 0),  # GREEN 1.0
              ("Normal mediastinum.", "Normal mediastinum, no mass."): (1, 1),  # 0.5
              ("Normal mediastinum.", "Wide mediastinum."): (1, 1),  # 0.5
              ("Lungs are clear.", "Clear."): (2, 0),  # 1.0
              ("Lungs are clear.", "Cannot parse this."): None,
              ("No effusion.", "No effusion."): (1, 0), ("No effusion.", "No pleural effusion."): (1, 0)}
    candidates = {
        "a": {"candidates": [
            # 1.0 lung, 1 heart (both empty), 0.5 mediastinal, 0 bone (a finding where the reference has none)
            candidate(lung="Lungs are clear.", mediastinal="Normal mediastinum, no mass.", bone="Old rib fracture."),
            candidate(heart="Cardiomegaly."),  # 0 lung (missed, no judge call), 0 heart, 0 mediastinal, 1 bone
            candidate(lung="Cannot parse this.", mediastinal="Wide mediastinum."),  # unparseable: no reward
            candidate(lung="Clear.", mediastinal="Wide mediastinum.", bone="Old rib fracture."),  # 0.625, shorter
        ]},
        "b": {"candidates": [candidate(lung="No effusion."), candidate(lung="No pleural effusion.")]},  # both 1.0
    }
    green = seeded_judge(tmp_path, scores)
    rewards = preference.candidate_rewards([a, b], candidates, green)
    assert green.model is None  # every judged pair came from the cache
    assert [r["reward"] for r in rewards["a"]] == [0.625, 0.25, None, 0.625]
    assert rewards["a"][0]["regions"] == {"lung": 1.0, "heart": 1.0, "mediastinal": 0.5, "bone": 0.0}
    assert [r["reward"] for r in rewards["b"]] == [1.0, 1.0]

    settings = preference.preference_settings(judge=green.label)
    pairs, counts = preference.preference_pairs([a, b], candidates, rewards, settings, held_out={"b"})
    assert counts == {"studies": 2, "candidates": 6, "unparseable candidates": 1,
                      "samples left out (non-finite probabilities)": 0, "no pair (rewards within min_gap)": 1,
                      "pairs": 1, "held-out pairs": 0}
    [pair] = pairs
    texts = [c["text"] for c in candidates["a"]["candidates"]]
    assert pair["chosen"] == texts[3] and pair["rejected"] == texts[1]  # the shorter of the two best
    assert (pair["chosen_reward"], pair["rejected_reward"], pair["held_out"]) == (0.625, 0.25, False)
    assert pair["chosen_words"] == len(texts[3].split())
    preference.write_pairs(tmp_path / "preferences.jsonl", pairs)
    assert preference.read_pairs(tmp_path / "preferences.jsonl") == pairs
    lengths = preference.length_summary(pairs)
    assert lengths["chosen words"]["mean"] == len(texts[3].split()) and lengths["chosen longer"] == 1


def test_pairs_prefer_the_shorter_report_only_within_the_margin():
    texts = ["one two three four five six", "one two", "one two three", "a b c d e f g h"]
    candidates = [{"text": t} for t in texts]

    def pair(rewards, **options):
        return preference.choose_pair(candidates, [{"reward": r} for r in rewards], **options)

    assert pair([0.80, 0.78, 0.2, 0.21])["chosen"] == texts[1]  # 0.78 ties with 0.80 and is shorter
    assert pair([0.80, 0.70, 0.2, 0.21])["chosen"] == texts[0]  # 0.70 is outside the margin: the best wins
    assert pair([0.80, 0.70, 0.2, 0.21])["rejected"] == texts[3]  # the longer of the two worst
    assert pair([0.5, 0.45, 0.46, 0.5]) is None  # no gap of min_gap
    assert pair([0.5, None, None, 0.5]) is None


def test_the_cost_table_is_computed_for_t4_and_a100():
    table = preference.cost_table()
    assert set(table.index.get_level_values("GPU")) == {"T4", "A100-40GB"}
    assert set(table.index.get_level_values("DPO_STUDIES")) == set(preference.STUDIES)
    assert "computed" in table.attrs["note"] and "not measured" in table.attrs["note"]
    t4, a100 = table.loc["T4"], table.loc["A100-40GB"]
    assert (t4["total with continuous (h)"] > a100["total with continuous (h)"]).all()  # a slower GPU costs more
    assert t4.loc[2069, "judged region pairs"] == round(2069 * 5 * preference.JUDGED_REGIONS)
    hours = t4.loc[2069, ["candidates (h)", "judge, continuous (h)", "DPO, one epoch (h)"]].sum()
    assert math.isclose(hours, t4.loc[2069, "total with continuous (h)"], abs_tol=0.02)
    # continuous batching: no batch waits for its longest answer, and the cache holds more sequences than a batch
    assert (table["judge, continuous (h)"] < table["judge, static (h)"]).all()
    static = preference.cost_table(engine="static")
    assert static["judge, static (h)"].equals(table["judge, static (h)"])
    assert (static["total with static (h)"] > table["total with continuous (h)"]).all()


# ---------------------------------------------------------------- the stage on the tiny model

class Interrupt(Exception):
    pass


class WatchReference(TrainerCallback):
    """In the preference stage: the frozen reference's logits on a fixed batch at its start and end, the policy's at
    its start, and the step-1 loss (ln 2 when the policy starts equal to its reference)."""

    def __init__(self, batch):
        self.batch, self.logits, self.first_loss = batch, {}, None

    def logits_of(self, model, adapter):
        training_mode = model.training
        model.eval()
        with torch.no_grad(), use_adapter(model, adapter):
            logits = model(**self.batch).logits.clone()
        model.train(training_mode)
        return logits

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.output_dir.endswith("preference"):
            self.logits["ref at start"] = self.logits_of(model, "ref")
            self.logits["policy at start"] = self.logits_of(model, "default")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if args.output_dir.endswith("preference") and "loss" in logs and self.first_loss is None:
            self.first_loss = logs["loss"]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.output_dir.endswith("preference"):
            self.logits["ref at end"] = self.logits_of(model, "ref")
            self.logits["policy at end"] = self.logits_of(model, "default")


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if args.output_dir.endswith("preference") and state.global_step == self.step:
            raise Interrupt


@pytest.fixture(scope="module")
def train_studies(sample_studies):
    return data.by_split(sample_studies, "train")


def dpo_config(tiny_model_dir, green, **overrides):
    stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage_dpo"]]
    # min_gap 0: any two distinct candidates pair, so the tiny random model always gives this test pairs
    return training.make_config(DEMO, **{
        "model_id": str(tiny_model_dir), "max_length": 512, "stages": stages, "target_tokens_max": 12, "save_steps": 2,
        "preference": {**preference.preference_settings(judge=green.label), "min_gap": 0.0}, **overrides})


def by_score_of_text(monkeypatch):
    """GREEN scores that differ between candidates without a judge model: from a hash of the judge's cached answer
    key. Only the stage's mechanics are under test here (the demo judge's answers: tests/test_green.py)."""
    monkeypatch.setattr(preference, "score_response",
                        lambda response: {"green": int(storage.sha256(response)[:4], 16) % 5 / 4})


def fake_judge(tmp_path, monkeypatch):
    """A Judge that answers every pair at once with its text, scored by `by_score_of_text`; counts its calls."""
    by_score_of_text(monkeypatch)
    green = judge.Judge(JUDGE_ID, tmp_path / "green_cache.jsonl")
    calls = []

    def answer(pairs):
        calls.append(len(pairs))
        keys = [judge.judge_key(green.label, *p) for p in pairs]
        todo = {k: p for k, p in zip(keys, pairs) if k not in green.store}
        green.store.append([{"key": k, "judge": green.label, "reference": p[0], "candidate": p[1],
                             "response": f"{p[0]}|{p[1]}", "truncated": False} for k, p in todo.items()])
        return [green.store.get(k) for k in keys]

    monkeypatch.setattr(green, "judge", answer)
    return green, calls


def test_the_stage_starts_from_stage_2_with_stage_2_as_its_frozen_reference(tiny_model_dir, train_studies, tmp_path,
                                                                           monkeypatch):
    green, _ = fake_judge(tmp_path, monkeypatch)
    config = dpo_config(tiny_model_dir, green)
    fit, held = train_studies[:4], train_studies[4:6]
    run = runs.Artifacts(tmp_path).run("dpo")
    processor = modeling.load_processor(str(tiny_model_dir), visual_tokens=config["visual_tokens"])
    processor.chat_template = modeling.training_chat_template(processor)
    watch = WatchReference(modeling.generation_inputs(processor, [data.study_images(fit[0], 3)]))  # a fixed batch
    metrics = training.train(run, config, fit, held, callbacks=[watch], judge=green)

    stage2, stage3 = (run.checkpoints_dir / name / "final" for name in ("2_vision_lora", "3_preference"))
    record = metrics["stages"][2]
    assert record["name"] == "preference" and record["preference"]["pairs"] >= 1
    assert math.isclose(watch.first_loss, math.log(2), abs_tol=1e-3)  # the policy starts as the reference
    assert torch.equal(watch.logits["ref at start"], watch.logits["policy at start"])
    assert torch.equal(watch.logits["ref at start"], watch.logits["ref at end"])  # the reference never trains
    assert not torch.equal(watch.logits["policy at start"], watch.logits["policy at end"])
    # the reference's weights are stage 2's; the run's adapter is the preference stage's, without the reference
    ref = load_peft_weights(str(stage3 / "ref"))
    expected = load_peft_weights(str(stage2))
    assert ref.keys() == expected.keys() and all(torch.equal(ref[k], expected[k]) for k in ref)
    adapter, final = load_peft_weights(str(run.adapter_dir)), load_peft_weights(str(stage3))
    assert adapter.keys() == final.keys() and all(torch.equal(adapter[k], final[k]) for k in adapter)
    assert not (run.adapter_dir / "ref").exists() and list(json.loads(
        (run.adapter_dir / "adapter_config.json").read_text())["modules_to_save"]) == [families.FAMILIES[0].projector]
    pairs = preference.read_pairs(run.preferences_path)
    assert {p["id"] for p in pairs} <= {s.id for s in fit + held}
    assert all(set(p) == {"id", "held_out", "chosen", "rejected", "chosen_reward", "rejected_reward",
                          "chosen_words", "rejected_words"} for p in pairs)
    assert "error" not in record["holdout_nlg"]


def test_a_kill_in_any_phase_resumes_with_nothing_lost_or_duplicated(tiny_model_dir, train_studies, tmp_path,
                                                                   monkeypatch):
    green, _ = fake_judge(tmp_path, monkeypatch)
    real_rewards, judge_calls = preference.candidate_rewards, []

    def rewards(studies, candidates, green):
        judge_calls.append(len(studies))
        return real_rewards(studies, candidates, green)

    monkeypatch.setattr(preference, "candidate_rewards", rewards)
    config = dpo_config(tiny_model_dir, green, save_steps=1)
    fit, held = train_studies[:4], train_studies[4:6]
    run = runs.Artifacts(tmp_path).run("dpo")
    studies = fit + held

    # killed while sampling: the first batch's candidates are kept
    real_sample, sampled = preference_stage.sample_batch, []

    def sample_then_die(*args, **kwargs):
        if sampled:
            raise Interrupt
        sampled.append(1)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(preference_stage, "sample_batch", sample_then_die)
    with pytest.raises(Interrupt):
        training.train(run, config, fit, held, judge=green)
    first = run.candidates_path.read_text().splitlines()
    assert 0 < len(first) < len(studies) and not judge_calls
    monkeypatch.setattr(preference_stage, "sample_batch", real_sample)

    # killed after the first preference checkpoint: candidates and pairs stay, training resumes from the checkpoint
    with pytest.raises(Interrupt):
        training.train(run, config, fit, held, callbacks=[InterruptAt(1)], judge=green)
    lines = run.candidates_path.read_text().splitlines()
    assert lines[:len(first)] == first and len(lines) == len({json.loads(line)["id"] for line in lines}) == len(studies)
    pairs_before = run.preferences_path.read_text()
    judged = len(storage.JsonlStore(tmp_path / "green_cache.jsonl", "key").records)
    assert judge_calls == [len(studies)]  # every study's candidates judged, once

    metrics = training.train(run, config, fit, held, judge=green)
    record = metrics["stages"][2]
    assert record["resumed_from_step"] == 1 and record["global_step"] > 1
    assert run.preferences_path.read_text() == pairs_before and run.candidates_path.read_text().splitlines() == lines
    assert judge_calls == [len(studies)]  # not judged again
    cache = tmp_path / "green_cache.jsonl"  # absent when no candidate of the random model wrote a region
    cache_lines = cache.read_text().splitlines() if cache.is_file() else []
    assert len(cache_lines) == judged == len({json.loads(line)["key"] for line in cache_lines})
    assert record["preference"] == json.loads(run.preference_summary_path.read_text())
    assert record["preference"]["seconds per study sampled"] is not None


def test_the_sft_counterpart_is_the_run_with_the_same_settings_and_its_sft_stages_only(tmp_path):
    artifacts = runs.Artifacts(tmp_path)
    sft_stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage"]]
    dpo_stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage_dpo"]]
    common = {"model_id": "m", "max_views": 3, "lora": {"r": 16}, "seed": 0}
    configs = {"sft": {**common, "preset": "two_stage", "stages": sft_stages},
               "sft-other-seed": {**common, "seed": 1, "preset": "two_stage", "stages": sft_stages},
               "dpo": {**common, "preset": "two_stage_dpo", "stages": dpo_stages, "preference": {"beta": 0.1}},
               "dpo-alone": {**common, "seed": 1, "max_views": 2, "preset": "two_stage_dpo", "stages": dpo_stages,
                             "preference": {"beta": 0.1}}}
    for name, config in configs.items():
        storage.atomic_write_json(artifacts.run(name).config_path, config)
    from helpers.evaluate import evaluation

    assert evaluation.sft_counterparts(artifacts, list(configs)) == {"dpo": "sft", "dpo-alone": None}
    assert evaluation.sft_counterparts(artifacts, ["sft-other-seed", "dpo"]) == {"dpo": None}


def test_the_memory_check_counts_both_sequences_of_a_preference_pair(tiny_model_dir):
    from transformers import AutoConfig

    t4 = resolve("demo")
    sft = training.make_config(t4, model_id=str(tiny_model_dir), max_length=1000, preset="two_stage", batch_size=1)
    dpo = {**sft, "stages": training.resolve_stages("two_stage_dpo", 3), "preference": {"beta": 0.1}}
    model_config = AutoConfig.from_pretrained(str(tiny_model_dir))
    sft_parts, dpo_parts = (recipe.memory_estimate_gib(c, model_config) for c in (sft, dpo))
    assert recipe.dpo_batch({**sft, "batch_size": 1, "grad_accum": 8}) == (1, 8)  # 8 pairs per optimizer step
    assert recipe.dpo_batch({**sft, "batch_size": 4, "grad_accum": 2}) == (2, 4)
    assert math.isclose(dpo_parts["activations"], 2 * sft_parts["activations"])  # batch 1: one pair, two sequences
    assert dpo_parts["weights"] == sft_parts["weights"]


def test_the_comparison_with_the_sft_counterpart_takes_metrics_that_did_not_run():
    """GREEN's paired difference per region, NLG with METEOR switched off (None), length and distinct reports."""
    import pandas as pd

    from helpers.evaluate import evaluation, green
    from helpers.core.report_format import REPORT

    rows = [{"system": system, "split": split, "id": f"s{i}", "region": region, "green": score,
             "ref_empty": False, "parsed": True}
            for system, score in (("sft", 0.5), ("dpo", 0.75)) for split in ("val", "test") for i in range(3)
            for region in green.SCORED]
    frame = pd.DataFrame(rows)
    stats = frame.groupby(["system", "split", "region"], as_index=False).green.mean()
    nlg = pd.DataFrame([{"system": system, "split": split, "region": REPORT, "BLEU-1": bleu, "BLEU-4": bleu,
                         "METEOR": None, "ROUGE-L": bleu, "CIDEr": bleu}
                        for system, bleu in (("sft", 0.3), ("dpo", 0.2)) for split in ("val", "test")])
    lengths = pd.DataFrame([{"system": system, "split": name, "mean words": words, "distinct reports": 2}
                            for system, words in (("sft", 20.0), ("dpo", 30.0)) for name in ("Validation", "Testing")]
                           ).set_index(["system", "split"])
    comparison = evaluation.preference_comparison({"dpo": "sft"}, frame, stats, nlg, lengths, n_boot=50)
    by = comparison[comparison.split == "Testing"].set_index("measure")
    assert by.loc["GREEN Whole report", ["sft", "dpo", "difference", "ci_lo"]].tolist() == [0.5, 0.75, 0.25, 0.25]
    assert by.loc["BLEU-4 (whole report)", "difference"] == pytest.approx(-0.1)
    assert math.isnan(by.loc["METEOR (whole report)", "difference"])
    assert by.loc["mean words", "difference"] == 10 and not by.loc["mean words", "optimised by DPO"]
    words = evaluation.preference_in_words(comparison, {"dpo": "sft", "other": None})
    assert "other: no SFT counterpart" in words and "GREEN Whole report 0.500 -> 0.750 (+0.250 [+0.250, +0.250])" in words
