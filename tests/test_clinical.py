"""helpers.metrics.clinical: RadEval's metrics on random stand-in checkpoints loaded through RadEval's own code, the tables,
the bootstrap of corpus metrics and the paired differences."""
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import classification_report

from helpers.core import runs
from helpers.metrics import clinical, nlg, radeval_compat
from helpers.demo import radeval_stand_ins, tiny_models
from helpers.evaluate import plots
from helpers.core.data import REGIONS
from helpers.core.report_format import REPORT

NORMAL = {"lung": "The lungs are clear. No pleural effusion or pneumothorax.", "heart": "Heart size is normal.",
          "mediastinal": "The mediastinum is unremarkable.", "bone": "No acute osseous abnormality."}
RUNS = ["perfect", "normal"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than contending for two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(sample_studies):
    # the sample's val reports have no region split yet (notebook 01 makes it): train studies stand in for val
    with_regions = [s for s in sample_studies if s.regions]
    return {"val": [s for s in with_regions if s.split == "train"][:2],
            "test": [s for s in with_regions if s.split == "test"][:2]}


@pytest.fixture(scope="module")
def systems(references):
    """perfect: the references themselves; normal: one normal report, empty for the first study of each split (a pair
    RaTEScore cannot align); template (a baseline): exactly normal's texts."""
    def normal(split):
        return {s.id: {"regions": {r: "" for r in REGIONS} if i == 0 else NORMAL}
                for i, s in enumerate(references[split])}

    return {"perfect": {split: {s.id: {"regions": s.regions} for s in refs} for split, refs in references.items()},
            "normal": {split: normal(split) for split in references},
            "template": {split: normal(split) for split in references}}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, sample_studies):
    return radeval_stand_ins.build_radeval_stand_ins(tmp_path_factory.mktemp("radeval") / "radeval",
                                               tiny_models.tokenizer_corpus(sample_studies))


@pytest.fixture(scope="module")
def evaluated(systems, references, stand_ins):
    return clinical.evaluate(systems, references, reference_run="normal", run_names=RUNS, n_boot=200, seed=0,
                             stand_ins=stand_ins)


def test_every_metric_runs_through_radeval(evaluated, stand_ins):
    table, _, scores = evaluated
    assert radeval_compat.unavailable() == {} and set(clinical.GROUPS) == set(radeval_compat.SCORERS)
    registry = set(radeval_compat.import_radeval("radeval.metrics._registry").METRIC_REGISTRY)
    assert registry == set(radeval_compat.LEFT_OUT) | (set(radeval_compat.SCORERS) & registry)  # run, or why not
    assert "torchvision" not in sys.modules  # RadEval lists it, none of the metrics run here imports it
    assert not table[clinical.COLUMNS].isna().any().any()
    perfect = table.xs("perfect", level="system")
    for column in ("BERTScore", "BERTScore distilroberta", "SembScore", "CheXbert F1 micro-14"):
        assert perfect[column].to_numpy() == pytest.approx(1, abs=1e-5)  # identical texts, whatever the weights
    assert (table.Checkpoints == "random stand-ins: meaningless").all()
    # the pair with an empty candidate gets RaTEScore's no-entity score instead of shifting the others
    first = scores[(scores.system == "normal") & (scores.candidate == "")]
    assert len(first) == 2 and (first.RaTEScore == 0.5).all()
    assert (stand_ins / "radgraph" / "radgraph-xl" / "weights.th").is_file()  # RadEval unpacked the archive itself


def test_chexbert_f1_is_radevals():
    """The vectorized F1 of pooled label counts is the classification_report F1CheXbert.forward reports (forward
    itself fails under scikit-learn 1.9: its per-sample accuracy calls count_nonzero on a dense matrix)."""
    rng = np.random.default_rng(0)
    reference, candidate = (rng.integers(0, 2, (12, 14)) * (rng.random((12, 14)) < 0.3) for _ in range(2))
    part = pd.DataFrame({"chexbert_reference": list(reference), "chexbert_candidate": list(candidate)})
    chexbert = radeval_compat.import_radeval("radeval.metrics.f1chexbert.f1chexbert").F1CheXbert
    top5, names = clinical._top5_index(), [*chexbert.CONDITION_NAMES, chexbert.NO_FINDING]
    reports = {"all": classification_report(reference, candidate, target_names=names, output_dict=True),
               "5": classification_report(reference[:, top5], candidate[:, top5], target_names=chexbert.TOP5,
                                          output_dict=True)}
    for column, (labels, average) in clinical.CHEXBERT.items():
        assert clinical.statistic(part, column, np.ones((1, 12)))[0] == pytest.approx(
            reports[labels][f"{average} avg"]["f1-score"])


def test_tables_outputs_and_leaderboard(evaluated, tmp_path):
    table, diff, scores = evaluated
    intervals = [f"{c} {end}" for c in clinical.COLUMNS for end in ("lo", "hi")]
    assert list(table.columns) == ["Studies", *clinical.COLUMNS, *intervals, "Checkpoints"]
    assert set(table.index) == {(s, split) for s in ("perfect", "normal", "template")
                                for split in ("Validation", "Testing")}
    assert (table.Studies == 2).all()
    assert (table[[f"{c} lo" for c in clinical.COLUMNS]].to_numpy() <= table[clinical.COLUMNS].to_numpy() + 1e-9).all()
    assert set(zip(diff.run, diff.split, diff.metric)) == {
        ("perfect", split, c) for split in ("Validation", "Testing") for c in clinical.COLUMNS}
    nlg = pd.DataFrame([{"system": s, "split": split, "region": REPORT, "BLEU-2": 0.1}
                        for s in ("perfect", "normal", "template") for split in ("val", "test")])
    green = pd.DataFrame({"Whole report": 0.2}, index=pd.MultiIndex.from_product(
        [["perfect", "normal", "template"], ["Validation", "Testing"]], names=["system", "split"]))
    board = clinical.leaderboard(table, nlg, green)
    assert list(board.columns) == clinical.REXRANK_COLUMNS and list(board.index) == ["perfect", "normal", "template"]
    assert board.loc["perfect", "BERTScore"] == table.loc[("perfect", "Testing"), "BERTScore distilroberta"]
    artifacts = runs.Artifacts(tmp_path)
    written = clinical.write_outputs(table, diff, scores, artifacts, board)
    assert pd.read_csv(artifacts.compare_dir / "clinical.csv", index_col=[0, 1]).columns.tolist() == list(table.columns)
    assert pd.read_csv(artifacts.compare_dir / "clinical_diff.csv").columns.tolist() == list(diff.columns)
    assert (artifacts.compare_dir / "rexrank_iu_xray.csv").read_text().startswith("# Comparable with ReXrank")
    assert len(written) == 4
    plots.plot_clinical(table, RUNS, tmp_path / "clinical.png")
    assert (tmp_path / "clinical.png").stat().st_size > 0


def test_paired_differences_identical_and_better(evaluated):
    _, _, scores = evaluated
    same = clinical.paired_differences(scores, ["template"], "normal", n_boot=200)
    assert (same.difference == 0).all() and (same.ci_lo == 0).all() and (same.ci_hi == 0).all()
    assert not same.excludes_0.any()
    _, diff, _ = evaluated
    bert = diff[diff.metric == "BERTScore"]
    assert (bert.difference > 0).all() and bert.excludes_0.all() and (bert.wins == 1).all()  # copies beat a template
    assert diff[diff.metric.isin(list(clinical.CHEXBERT))].wins.isna().all()  # corpus metrics: no per-study wins


def test_corpus_bootstrap_recomputes_on_the_same_draws():
    """Resample weights draw studies as nlg.paired_bootstrap does: a mean's paired interval is the same either way;
    a corpus F1 is recomputed per resample (its interval brackets the value; constant labels give a point)."""
    rng = np.random.default_rng(1)
    a, b = rng.random(20), rng.random(20)
    weights = clinical.resample_weights(20, 300, 7)
    assert (weights.sum(axis=1) == 20).all()
    frame = lambda x: pd.DataFrame({"BERTScore": x})
    ours = np.percentile(clinical.statistic(frame(b), "BERTScore", weights) -
                         clinical.statistic(frame(a), "BERTScore", weights), [2.5, 97.5])
    assert ours == pytest.approx(nlg.paired_bootstrap(a, b, 300, 7)["ci95"])
    labels = lambda: [list(rng.integers(0, 2, 14)) for _ in range(20)]
    part = pd.DataFrame({"chexbert_reference": labels(), "chexbert_candidate": labels()})
    value = clinical.statistic(part, "CheXbert F1 micro-14", np.ones((1, 20)))[0]
    low, high = np.percentile(clinical.statistic(part, "CheXbert F1 micro-14", weights), [2.5, 97.5])
    assert low < value < high
    same = pd.DataFrame({"chexbert_reference": [[1] + [0] * 13] * 20, "chexbert_candidate": [[1] + [0] * 13] * 20})
    assert set(clinical.statistic(same, "CheXbert F1 macro-14", weights)) == {1 / 14}  # one label of 14 right
    radcliq = pd.DataFrame({"RadCliQ-v1": [2.0] * 10 + [4.0] * 10})
    assert clinical.statistic(radcliq, clinical.RADCLIQ, np.ones((1, 20)))[0] == pytest.approx(1 / 3)


def test_unavailable_metric_is_na_with_its_reason(monkeypatch, systems, references, capsys):
    scorer = radeval_compat.SCORERS["ratescore"][1]
    monkeypatch.setitem(radeval_compat.SCORERS, "ratescore", ("no_such_module_for_ratescore", scorer))
    assert radeval_compat.unavailable()["ratescore"].startswith("ModuleNotFoundError: No module named")
    scores = clinical.score_studies(systems, references, groups=["ratescore"])
    assert "RaTEScore: n/a (ModuleNotFoundError" in capsys.readouterr().out
    table = clinical.clinical_table(scores, n_boot=10)
    assert table.RaTEScore.isna().all() and table["RaTEScore lo"].isna().all() and not math.isnan(table.Studies.iloc[0])
