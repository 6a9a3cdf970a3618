"""NLG metrics equal pycocoevalcap called directly on R2Gen-cleaned texts (as R2Gen does); R2Gen's IU X-Ray cleaning,
quirks included; METEOR without Java; paired bootstrap arithmetic."""
import gc
import math
import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from helpers.metrics.nlg import METRICS, clean_report_iu_xray, meteor_unavailable_reason, nlg_metrics, paired_bootstrap

REFERENCES = [
    "The heart is normal in size. The lungs are clear.",
    "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax.",
    "Stable cardiomegaly. Mild pulmonary vascular congestion. No pleural effusion.",
    "The cardiomediastinal silhouette is within normal limits. Degenerative changes of the thoracic spine.",
    "Lungs are hyperexpanded. No acute cardiopulmonary abnormality.",
    "Small right pleural effusion. Heart size is mildly enlarged.",
]
HYPOTHESES = [
    "The heart is normal in size. The lungs are clear.",
    "The heart size is normal. The lungs are clear without pleural effusion or pneumothorax.",
    "Cardiomegaly. No pleural effusion or pneumothorax.",
    "Normal cardiomediastinal silhouette. No acute bony abnormality.",
    "The lungs are clear. No acute cardiopulmonary abnormality.",
    "Heart size is normal. No pleural effusion.",
]
# IU X-Ray-style reports with list numbers, runs of dots and punctuation that R2Gen's cleaning strips
PUNCTUATED_REFERENCES = [
    "1. The heart is normal in size. 2. The lungs are clear..",
    "Heart size: normal. No focal consolidation, effusion, or pneumothorax.",
    "Stable cardiomegaly (mild). Left/right costophrenic angles are sharp.",
    'Degenerative changes of the "thoracic" spine.. No acute bony abnormality.',
    "1. No acute cardiopulmonary abnormality. 2. Lungs are clear, without effusion.",
]
PUNCTUATED_HYPOTHESES = [
    "The heart is normal in size; the lungs are clear.",
    "Heart size is normal. No consolidation, effusion or pneumothorax.",
    "Mild cardiomegaly. The costophrenic angles are sharp.",
    "Degenerative changes of the thoracic spine. No acute abnormality.",
    "No acute cardiopulmonary abnormality. The lungs are clear.",
]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH")


def cleaned(texts):
    return [clean_report_iu_xray(t) for t in texts]


def direct_scores(references, hypotheses, meteor=True):
    """pycocoevalcap on texts keyed by index, as R2Gen and R2GenGPT call it (pass texts cleaned as they clean them)."""
    gts = {i: [r] for i, r in enumerate(references)}
    res = {i: [h] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {**{f"BLEU-{n}": b for n, b in enumerate(bleu, 1)}, "ROUGE-L": Rouge().compute_score(gts, res)[0],
              "CIDEr": Cider().compute_score(gts, res)[0]}
    if meteor:
        scores["METEOR"] = Meteor().compute_score(gts, res)[0]
    return scores


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java (nor anything else) to find


# Expected strings traced by hand through R2Gen's Tokenizer.clean_report_iu_xray (modules/tokenizers.py), step by step
@pytest.mark.parametrize("report, expected", [
    # "1. " removed, then ". 2. " -> ". "
    ("1. Heart size is normal. 2. Lungs are clear.", "heart size is normal . lungs are clear ."),
    # "..." -> ".." -> "." and ".." -> "." in the three passes
    ("Heart normal... Lungs clear..", "heart normal . lungs clear ."),
    # " / then ( ) , : and the final "." go; the hyphen stays ("-" is a range in R2Gen's class, not a character)
    ('Mild cardiomegaly (stable), no "acute" left/right effusion: x-ray 5 mm.',
     "mild cardiomegaly stable no acute leftright effusion x-ray 5 mm ."),
    # R2Gen's ':-\[' ranges over < = > @ too; # ~ $ | ` are in no range; one removed between spaces leaves two
    ("Opacity <1 cm> = stable @ left base; x-ray #2 ~ $ | `", "opacity 1 cm  stable  left base x-ray #2 ~ $ | ` ."),
    # the sentence "()" empties but is kept: R2Gen's filter `!= []` compares a string with a list
    ("Heart normal. (). Lungs clear.", "heart normal .  . lungs clear ."),
    ("", " ."),
    # "1. " is removed wherever it is, even inside "T11. " (with its space)
    ("Fracture of T11. Lungs clear.", "fracture of t1lungs clear ."),
    # " 3. " -> ". " eats a measurement; 6 is past R2Gen's list numbers and a leading "2. " has no space before it
    ("Nodule measures 4 x 3. Heart normal. 6. Spine intact.",
     "nodule measures 4 x . heart normal . 6 . spine intact ."),
    ("2. Heart normal.", "2 . heart normal ."),
    # only ". " splits sentences: a line break stays inside one
    ("Heart normal.\nLungs clear.", "heart normal\nlungs clear ."),
])
def test_clean_report_iu_xray_as_r2gen(report, expected):
    assert clean_report_iu_xray(report) == expected


@needs_java
def test_same_numbers_as_pycocoevalcap_with_meteor():
    references, hypotheses = REFERENCES + PUNCTUATED_REFERENCES, HYPOTHESES + PUNCTUATED_HYPOTHESES
    scores = nlg_metrics(references, hypotheses)
    assert scores == {**direct_scores(cleaned(references), cleaned(hypotheses)), "pairs": 11, "empty_references": 0,
                      "empty_hypotheses": 0}
    assert meteor_unavailable_reason() is None
    assert 0 < scores["METEOR"] < 1 and 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1


def test_meteor_none_without_java(no_java):
    scores = nlg_metrics(PUNCTUATED_REFERENCES, PUNCTUATED_HYPOTHESES)
    assert scores["METEOR"] is None and meteor_unavailable_reason().startswith("n/a: no Java")
    assert list(scores) == [*METRICS, "pairs", "empty_references", "empty_hypotheses"]
    assert {k: v for k, v in scores.items() if k in METRICS and k != "METEOR"} == direct_scores(
        cleaned(PUNCTUATED_REFERENCES), cleaned(PUNCTUATED_HYPOTHESES), meteor=False)


def test_r2gen_cleaning_changes_the_numbers(no_java):
    # lower-cased raw text (the scoring before R2Gen's cleaning) keeps "1.", "size." and "clear," as tokens of their own
    raw = Bleu(4).compute_score({i: [r.lower()] for i, r in enumerate(PUNCTUATED_REFERENCES)},
                                {i: [h.lower()] for i, h in enumerate(PUNCTUATED_HYPOTHESES)}, verbose=0)[0]
    scores = nlg_metrics(PUNCTUATED_REFERENCES, PUNCTUATED_HYPOTHESES)
    assert scores["BLEU-1"] > raw[0] + 0.2 and scores["BLEU-4"] > raw[3] + 0.2  # measured 0.61 -> 0.87, 0.32 -> 0.61


def test_case_and_whitespace_do_not_matter(no_java):
    messy = [" ".join(r.upper().split()).replace(". ", ".\n  ") for r in REFERENCES]
    assert nlg_metrics(messy, HYPOTHESES) == nlg_metrics(REFERENCES, HYPOTHESES)


def test_cleaned_texts_are_scored_single_spaced(no_java):
    # R2Gen scores token ids decoded with single spaces; ROUGE-L's split(" ") would count a double space as a token
    reference, hypothesis = "Heart is normal. (). Lungs are clear.", "Heart is normal. Lungs are clear."
    assert "  " in clean_report_iu_xray(reference)
    assert nlg_metrics([reference], [hypothesis])["ROUGE-L"] == Rouge().compute_score(
        {0: ["heart is normal . . lungs are clear ."]}, {0: ["heart is normal . lungs are clear ."]})[0]


def test_empty_references_are_counted_not_scored(no_java):
    # texts without a word once cleaned ("", "...", "1. ", "()") are empty, not the lone " ." R2Gen makes of them
    scores = nlg_metrics(REFERENCES + ["", "  ", "...", "1. "], HYPOTHESES + ["", "Heart size is normal.", "()", ""])
    assert scores == {**nlg_metrics(REFERENCES, HYPOTHESES), "empty_references": 4}
    nothing = nlg_metrics(["", "(.)"], ["", "The lungs are clear."])  # pycocoevalcap's CIDEr would crash here
    assert nothing["pairs"] == 0 and nothing["empty_references"] == 2
    assert all(math.isnan(nothing[k]) for k in METRICS if k != "METEOR") and nothing["METEOR"] is None


def test_empty_hypothesis_is_scored_as_a_miss(no_java):
    scores = nlg_metrics(REFERENCES, HYPOTHESES[:-2] + ["", ". ."])
    assert scores["empty_hypotheses"] == 2 and scores["pairs"] == 6
    # scored as "" (what R2Gen decodes from an empty generation), not as " .", which would match every final " ."
    assert {k: v for k, v in scores.items() if k in METRICS and k != "METEOR"} == direct_scores(
        cleaned(REFERENCES), cleaned(HYPOTHESES[:-2]) + ["", ""], meteor=False)
    assert scores["ROUGE-L"] < nlg_metrics(REFERENCES, HYPOTHESES)["ROUGE-L"]
    with pytest.raises(ValueError, match="6 references but 5 hypotheses"):
        nlg_metrics(REFERENCES, HYPOTHESES[:5])


def test_meteor_java_failure_raises_and_does_not_hang(monkeypatch, tmp_path):
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: broken test JVM' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")  # the fake java comes first
    with pytest.raises(RuntimeError, match="broken test JVM"):
        nlg_metrics(REFERENCES, HYPOTHESES)
    gc.collect()  # pycocoevalcap's Meteor.__del__ would block forever had its lock been left held


def test_bootstrap_constant_improvement():
    a = np.random.default_rng(1).uniform(0, 0.8, size=200)
    result = paired_bootstrap(a, a + 0.1)
    assert result["b_minus_a"] == pytest.approx(0.1)
    assert result["ci95"] == pytest.approx((0.1, 0.1)) and result["ci95"][1] - result["ci95"][0] < 1e-12
    assert (result["a_wins"], result["ties"], result["a_loses"]) == (0, 0, 1)
    assert (result["studies"], result["unpaired"]) == (200, 0)
    assert result["mean_b"] - result["mean_a"] == pytest.approx(0.1)


def test_bootstrap_identical_systems():
    a = np.linspace(0, 1, 50)
    result = paired_bootstrap(a, a.copy())
    assert result["b_minus_a"] == 0 and result["ci95"] == (0, 0)
    assert (result["a_wins"], result["ties"], result["a_loses"]) == (0, 1, 0)


def test_bootstrap_pairs_only_studies_scored_by_both():
    a = [0.5, np.nan, 0.2, 0.9, np.nan, 0.4]
    b = [0.7, 0.3, np.nan, 0.6, np.nan, 0.4]  # paired: studies 0, 3, 5 (differences +0.2, -0.3, 0)
    result = paired_bootstrap(a, b, n_boot=2000)
    assert (result["studies"], result["unpaired"]) == (3, 3)
    assert result["b_minus_a"] == pytest.approx(-0.1 / 3)
    assert (result["a_wins"], result["ties"], result["a_loses"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # a resample of three studies is all -0.3 (or all +0.2) with probability 1/27 > 2.5%: the interval's ends
    assert result["ci95"] == pytest.approx((-0.3, 0.2))
    assert paired_bootstrap(a, b, n_boot=2000) == result  # seeded: reproducible
    none = paired_bootstrap([np.nan, 1.0], [0.5, np.nan])
    assert none["studies"] == 0 and math.isnan(none["b_minus_a"]) and all(map(math.isnan, none["ci95"]))
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([0.1, 0.2], [0.1])
