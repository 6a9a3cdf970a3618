"""Does the model look? The ablated views (blank, shuffled), their resumable generation, and notebook 04's table:
unchanged shares counted, GREEN judged through the cache (hand-written judge answers seeded there, as test_green
does), the paired difference against the real views and the one-sentence verdict."""
import numpy as np
import pandas as pd
import pytest
from test_green import HAND_JUDGE, answer, seed_cache

from helpers import commands
from helpers.core import data, runs
from helpers.judge import judge
from helpers.evaluate import green, grounding
from helpers.core.data import REGIONS, Study
from helpers.core.storage import JsonlStore


def test_derangement_moves_every_study_and_is_seeded():
    for n in (2, 3, 10, 97):
        order = grounding.derangement(n, seed=0)
        assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))
        assert order == grounding.derangement(n, seed=0)
    assert grounding.derangement(97, seed=0) != grounding.derangement(97, seed=1)


def test_ablated_views_keep_the_prompt_blank_at_the_mean_grey_or_another_studys(sample_studies):
    studies = data.by_split(sample_studies, "test")
    grey = grounding.mean_grey(studies, 3)
    pixels = np.concatenate([np.asarray(v.convert("L")).ravel() for s in studies for v in data.study_images(s, 3)])
    assert grey == round(pixels.mean())
    blank = grounding.ablation_views(studies, "blank", 3, grey=grey)
    shuffled = grounding.ablation_views(studies, "shuffled", 3, seed=0)
    donors = grounding.derangement(len(studies), seed=0)
    for study, donor in zip(studies, donors):
        own = data.study_images(study, 3)
        assert [v.size for v in blank(study)] == [v.size for v in own]
        assert all(np.unique(np.asarray(v)).tolist() == [grey] for v in blank(study))
        theirs = data.study_images(studies[donor], 3)
        swapped = shuffled(study)
        assert len(swapped) == len(own)  # same number of <image> placeholders: the same prompt
        assert all(np.array_equal(np.asarray(a), np.asarray(theirs[i % len(theirs)])) for i, a in enumerate(swapped))


def test_ablations_are_generated_once_and_resume(model_and_processor, sample_studies, tmp_path):
    model, processor = model_and_processor
    run = runs.Artifacts(tmp_path).run("r")
    studies = data.by_split(sample_studies, "test")[:3]
    first = grounding.generate_ablations(model, processor, studies, run, max_views=3, max_new_tokens=6)
    assert {a: f["generated_now"] for a, f in first.items()} == {"blank": 3, "shuffled": 3}
    again = grounding.generate_ablations(model, processor, studies, run, max_views=3, max_new_tokens=6)
    assert {a: (f["generated_now"], f["already_done"]) for a, f in again.items()} == {"blank": (0, 3),
                                                                                      "shuffled": (0, 3)}
    assert sorted(JsonlStore(grounding.predictions_path(run, "blank"), key_field="id").records) == sorted(
        s.id for s in studies)


def prediction(**regions):
    return {"regions": {r: regions.get(r, "") for r in REGIONS}}


def test_unchanged_share_green_and_the_paired_difference(tmp_path, capsys):
    artifacts = runs.Artifacts(tmp_path)
    refs = [Study(f"s{i}", "test", {**{r: "" for r in REGIONS}, "others": "", "lung": "Effusion.",
                                    "heart": "Normal."}, None) for i in range(2)]
    real = prediction(lung="Effusion.", heart="Normal.")
    files = {("looks", "test"): {"s0": real, "s1": real},
             ("looks", "test_blank"): {"s0": real, "s1": prediction(lung="Clear.", heart="Normal.")},
             ("looks", "test_shuffled"): {"s0": prediction(lung="Clear.", heart="Normal."),
                                          "s1": prediction(lung="Clear.", heart="Enlarged.")},
             ("blind", "test"): {"s0": real, "s1": real}, ("blind", "test_blank"): {"s0": real, "s1": real},
             ("blind", "test_shuffled"): {"s0": real, "s1": real}}
    pairs = {}
    for (run, name), predictions in files.items():
        JsonlStore(artifacts.run(run).generate_dir / f"predictions_{name}.jsonl", key_field="id").append(
            [{"id": k, **v} for k, v in predictions.items()])
        for row in green.region_pairs(run, "test", refs, predictions):  # GREEN 1 for a match, 0 otherwise
            pairs[(row["reference"], row["candidate"])] = (
                answer(1) if row["reference"] and row["reference"] == row["candidate"] else answer(0, {"a": 1}))
    seed_cache(tmp_path / "cache.jsonl", HAND_JUDGE, pairs)
    table = grounding.evaluate(artifacts, ["looks", "blind"], refs, judge.Judge(HAND_JUDGE, tmp_path / "cache.jsonl"),
                               n_boot=200)
    assert list(table.columns[:5]) == ["system", "ablation", "region", "studies", "unchanged"]
    looks = table[table.system == "looks"].set_index(["ablation", "region"])
    assert looks.unchanged.to_dict() == {
        ("blank", "Lung"): 0.5, ("blank", "Heart"): 1.0, ("blank", "Mediastinal"): 1.0, ("blank", "Bone"): 1.0,
        ("blank", "Whole report"): 0.5, ("shuffled", "Lung"): 0.0, ("shuffled", "Heart"): 0.5,
        ("shuffled", "Mediastinal"): 1.0, ("shuffled", "Bone"): 1.0, ("shuffled", "Whole report"): 0.0}
    assert looks.loc[("blank", "Lung"), ["GREEN", "GREEN real", "difference"]].tolist() == [0.5, 1.0, -0.5]
    assert looks.loc[("shuffled", "Whole report"), ["GREEN", "difference", "ci_lo", "ci_hi"]].tolist() == [
        0.0, -1.0, -1.0, -1.0]
    assert looks.loc[("blank", "Mediastinal")].GREEN != looks.loc[("blank", "Mediastinal")].GREEN  # no reference: n/a
    words = grounding.in_words(table).splitlines()
    assert words[0].startswith("looks looks at the X-ray and scores higher with its own views (2 test studies): with "
                               "blank views 50% of the reports change and whole-report GREEN moves -0.500 [")
    assert words[1] == ("blind does not look at the X-ray: it writes the same report for all 2 test studies with blank "
                        "views and with another study's views.")
    paths = grounding.write_outputs(table, artifacts)
    assert pd.read_csv(paths[0]).equals(table.reset_index(drop=True).astype(pd.read_csv(paths[0]).dtypes.to_dict()))
    assert paths[1].stat().st_size > 10_000


def test_runs_without_ablations_are_named_and_left_out(tmp_path, capsys):
    artifacts = runs.Artifacts(tmp_path)
    refs = [Study("s0", "test", {**{r: "" for r in REGIONS}, "others": ""}, None)]
    JsonlStore(artifacts.run("old").predictions("test"), key_field="id").append([{"id": "s0", **prediction()}])
    table = grounding.evaluate(artifacts, ["old"], refs, judge=None)
    assert table.empty and "no ablated reports for old blank, old shuffled" in capsys.readouterr().out
    assert grounding.in_words(table).startswith("No grounding check")
    with pytest.raises(ValueError, match="unknown ablation 'noise'"):
        grounding.ablation_views(refs, "noise", 3)


def test_generate_takes_grounding_studies_from_notebook_03():
    parser = commands.build_parser()
    assert vars(parser.parse_args(["generate"]))["GROUNDING_STUDIES"] == 100
    assert vars(parser.parse_args(["generate", "--grounding-studies", "None"]))["GROUNDING_STUDIES"] is None
    assert "PREDICT_IMAGES" not in vars(parser.parse_args(["generate"]))  # the notebook's display only
