"""The training target and its parser: exact round trip on gold reports, tolerance of what models really write."""
import pytest
from conftest import SHARED_IU_XRAY, needs_shared

from helpers.core.data import REGIONS
from helpers.core.report_format import INSTRUCTION, degenerate_reasons, format_report, parse_report, user_message

EMPTY = {"lung": "", "heart": "", "mediastinal": "", "bone": ""}


def regions(**kw):
    return {**EMPTY, **kw}


def test_format_is_four_fixed_lines_and_drops_others():
    text = format_report({"lung": "Clear.", "heart": "", "mediastinal": " Normal \n contour.", "bone": "Intact.",
                          "others": "Old granuloma."})
    assert text == "Lung: Clear.\nHeart:\nMediastinal: Normal contour.\nBone: Intact."


def test_round_trip_on_sample(sample_studies):
    for study in sample_studies:
        if study.regions:
            gold = {k: study.regions[k] for k in REGIONS}
            assert parse_report(format_report(study.regions)) == (gold, True), study.id


@needs_shared
def test_round_trip_on_every_gold_report_of_the_real_annotation():
    from helpers.core.data import read_annotation  # the reports only: the shared folder has no images

    annotation = read_annotation(SHARED_IU_XRAY / "annotation.json")
    reports = [(e["id"], e["report"]) for split in ("train", "test") for e in annotation[split]]
    assert len(reports) > 2000
    failures = [sid for sid, report in reports
                if parse_report(format_report(report)) != ({k: report[k].strip() for k in REGIONS}, True)]
    assert failures == []


@pytest.mark.parametrize("text, expected", [
    # markdown bullets and bold, header synonyms, case and spacing
    ("**Lungs:** Clear.\n**Heart**: Normal size.\n- Mediastinum: Unremarkable.\n* Bones: Intact.",
     regions(lung="Clear.", heart="Normal size.", mediastinal="Unremarkable.", bone="Intact.")),
    ("  LUNG :  clear\nheart:ok", regions(lung="clear", heart="ok")),
    ("1. Lung: clear\n2) Heart: ok\n## Bone: intact", regions(lung="clear", heart="ok", bone="intact")),
    # JSON, also in a code fence, extra keys ignored
    ('```json\n{"Lungs": "clear", "heart": "normal", "impression": "no disease", "bone": "N/A"}\n```',
     regions(lung="clear", heart="normal")),
    ('{"lung": "clear", "mediastinum": "stable"}', regions(lung="clear", mediastinal="stable")),
    # continuation lines are joined with a space
    ("Lung: No effusion.\nNo pneumothorax.\nHeart: Normal.", regions(lung="No effusion. No pneumothorax.", heart="Normal.")),
    # end-of-sequence junk, a leading BOS, an echoed prompt
    ("Lung: clear</s> Heart: garbage <pad><pad>", regions(lung="clear")),
    ("<s> Lung: clear\nHeart: ok<|im_end|>more", regions(lung="clear", heart="ok")),
    ("[INST] <image>\nWrite the findings [/INST] Lung: clear", regions(lung="clear")),
    # None / N/A mean empty
    ("Lung: None\nHeart: N/A\nMediastinal: Normal.\nBone: -", regions(mediastinal="Normal.")),
    # a repeated header: the first text wins
    ("Lung: first\nHeart: ok\nLung: second", regions(lung="first", heart="ok")),
    # missing sections are empty
    ("Heart: Enlarged.", regions(heart="Enlarged.")),
    # all on one line, and a non-region header that must not leak into the previous section
    ("Lung: Clear. Heart: Normal. Bone: Intact.", regions(lung="Clear.", heart="Normal.", bone="Intact.")),
    ("Bone: Intact.\n**Others:** Old granuloma.\nImpression: No acute disease.", regions(bone="Intact.")),
    ("Lung: Clear.\nLeft base: minimal atelectasis.", regions(lung="Clear. Left base: minimal atelectasis.")),
])
def test_parse_messy_outputs(text, expected):
    assert parse_report(text) == (expected, True)


@pytest.mark.parametrize("text", [None, "", "The patient is fine.", 42, "{not json", "```\n[1, 2]\n```"])
def test_unparsable_input_never_raises_and_is_flagged(text):
    assert parse_report(text) == (EMPTY, False)


@pytest.mark.parametrize("text, reasons", [
    ("Lung: Clear.\nHeart: Normal size.\nMediastinal: Normal.\nBone: Intact.", []),
    ('```json\n{"lung": "Clear.", "heart": "Normal.", "mediastinal": "", "bone": ""}\n```', []),
    ("Lung: Clear.\nHeart:\nMediastinal:\nBone:", []),  # empty regions are normal
    ("Lung: No effusion. No effusion.", []),  # a gold report repeats a sentence once
    # parsed, yet degenerate
    ("Heart:\n" * 8, ["repeated header", "no region text"]),
    ("Heart: " * 8, ["repeated header"]),  # one line: parse_report keeps the later headers as heart text
    ("Lung: Clear. Heart: Normal. Lungs: Clear.", ["repeated header"]),  # a synonym is the same header
    ("Lung:\nHeart:\nMediastinal:\nBone:", ["no region text"]),
    ('{"lung": "", "heart": "none"}', ["no region text"]),
    ("Lung: No effusion. No effusion. no effusion", ["repeated sentence"]),
    # unparsed
    ("The patient is fine.", ["no region header", "no region text"]),
    (None, ["no region header", "no region text"]),
    ("Lung: Clear.</s>Lung: Clear.", []),  # text after the end of sequence is not the answer
])
def test_degenerate_reasons(text, reasons):
    assert degenerate_reasons(text) == reasons
    assert parse_report(text)[1] == ("no region header" not in reasons)


def test_no_gold_report_with_text_is_degenerate(sample_studies):
    for study in sample_studies:
        if study.regions and any(study.regions[k] for k in REGIONS):
            assert degenerate_reasons(format_report(study.regions)) == [], study.id


@needs_shared
def test_no_gold_report_of_the_real_annotation_is_degenerate_but_for_empty_ones():
    from helpers.core.data import read_annotation

    annotation = read_annotation(SHARED_IU_XRAY / "annotation.json")
    reasons = {e["id"]: degenerate_reasons(format_report(e["report"])) for split in ("train", "test")
               for e in annotation[split]}
    assert {tuple(r) for r in reasons.values()} == {(), ("no region text",)}  # one train report has 'others' only


def test_user_message_has_one_image_per_view_then_the_instruction():
    for n in (1, 2, 3):
        content = user_message(n)["content"]
        assert [c["type"] for c in content] == ["image"] * n + ["text"] and content[-1]["text"] == INSTRUCTION
