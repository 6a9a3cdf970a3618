"""eval/compare/report.md from the artifacts: its GREEN tables equal green_compare.csv cell for cell, and every other
number is the one in the file it names (a small evaluation written by the real green / metrics functions from
hand-written judge answers seeded in the cache, as test_green does)."""
import json
import re

import pandas as pd
import pytest
from test_green import HAND_JUDGE, answer, seed_cache

from helpers.core import runs
from helpers.judge import judge
from helpers.metrics import nlg
from helpers.train import training
from helpers.evaluate import green, grounding, report
from helpers.core.data import REGIONS, Study
from helpers.evaluate.green import TABLE_COLUMNS
from helpers.core.settings import setup

STAGES = [{"stage": 1, "name": "frozen_vision", "epochs": 2, "lr": 2e-4, "global_step": 40, "seconds": 5400.0,
           "peak_gpu_memory_gb": 11.5, "best_checkpoint": "checkpoint-30", "best_eval_loss": 1.234},
          {"stage": 2, "name": "vision_lora", "epochs": 1, "lr": 1e-4, "global_step": 20, "seconds": 1800.0,
           "peak_gpu_memory_gb": 12.25, "best_checkpoint": None, "best_eval_loss": 1.1}]


def study(i, split, **regions):
    return Study(f"{split}{i}", split, {**{r: "" for r in REGIONS}, "others": "", **regions}, None)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir, sample_dir):
    root = tmp_path_factory.mktemp("artifacts")
    artifacts = runs.Artifacts(root)
    refs = {split: [study(i, split, lung=f"Effusion {i}.", heart="Normal." if i % 2 else "Enlarged.")
                    for i in range(6)] for split in ("val", "test")}
    systems = {name: {split: {s.id: {"regions": {**s.regions, "heart": "Normal.",
                                                 "lung": s.regions["lung"] if (i + shift) % 3 else "Clear."}}
                              for i, s in enumerate(studies)} for split, studies in refs.items()}
               for name, shift in (("run-a", 0), ("run-b", 1), ("template", 2))}
    pairs = {(row["reference"], row["candidate"]): answer(1) if row["reference"] == row["candidate"] else
             answer(1, {"b": 1}) if row["candidate"] else answer(0, {"b": 1})
             for system, by_split in systems.items() for split, predictions in by_split.items()
             for row in green.region_pairs(system, split, refs[split], predictions)}
    seed_cache(root / "cache.jsonl", HAND_JUDGE, pairs)
    frame = green.evaluate(systems, refs, judge.Judge(HAND_JUDGE, root / "cache.jsonl"))
    stats = green.region_stats(frame)
    tables = green.tables_by_system(frame, stats, 200, 0)
    diff = green.paired_differences(frame, ["run-a", "run-b"], "run-a", 200, 0)
    green.write_outputs(frame, stats, tables, diff, nlg.nlg_table(systems, refs, meteor=False), artifacts,
                        ["run-a", "run-b"])
    config = training.make_config(setup("demo", sample_dir, root), model_id=str(tiny_model_dir), max_length=512)
    for name in ("run-a", "run-b"):
        run = artifacts.run(name)
        run.train_dir.mkdir(parents=True)
        run.config_path.write_text(json.dumps({**config, "n_train": 12, "holdout_ids": ["x", "y"]}))
        run.metrics_path.write_text(json.dumps({"run": name, "stages": STAGES}))
    return artifacts


def section_table(text: str, heading: str) -> list[list[str]]:
    """The rows of the first markdown table after `heading`."""
    after = text[text.index(heading):]
    lines = [line for line in after.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def assert_tables_equal_green_compare(text: str, compare: pd.DataFrame) -> None:
    """Each system's table in report.md, cell for cell, is green_compare.csv's value and interval to 3 decimals."""
    for system in dict.fromkeys(compare.index.get_level_values(0)):
        header, _, *rows = section_table(text, f"### {system}\n")
        assert header == [""] + TABLE_COLUMNS
        assert [r[0] for r in rows] == list(compare.loc[system].index)
        for row in rows:
            for column, cell in zip(TABLE_COLUMNS, row[1:]):
                value, low, high = (compare.loc[(system, row[0]), c] for c in (column, f"{column} lo", f"{column} hi"))
                expected = "n/a" if pd.isna(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"
                assert cell == expected, (system, row[0], column)


def check_demo_report(artifacts) -> None:
    """What `make demo` must leave (tests/test_demo.py): report.md, its tables equal to green_compare.csv, and
    grounding.csv with both ablations for every run."""
    text = (artifacts.compare_dir / "report.md").read_text(encoding="utf-8")
    assert report.DEMO_NOTE in text
    assert_tables_equal_green_compare(text, pd.read_csv(artifacts.compare_dir / "green_compare.csv", index_col=[0, 1]))
    table = pd.read_csv(artifacts.compare_dir / "grounding.csv")
    assert set(zip(table.system, table.ablation)) == {(run.name, a) for run in artifacts.find_runs()
                                                      for a in grounding.ABLATIONS}
    assert table.unchanged.between(0, 1).all()
    assert all(verdict in text for verdict in grounding.in_words(table).splitlines())  # one sentence per run


def test_every_green_table_equals_green_compare_csv(artifacts):
    text = report.build(artifacts)
    compare = pd.read_csv(artifacts.compare_dir / "green_compare.csv", index_col=[0, 1])
    assert list(dict.fromkeys(compare.index.get_level_values(0))) == ["run-a", "run-b", "template"]
    assert_tables_equal_green_compare(text, compare)
    assert section_table(text, "### run-a\n")[2][0] == "Validation" and "n/a" in text  # no mediastinal reference
    assert text.index("### run-b") < text.index("## Baselines") < text.index("### template")
    assert f"Judge: {compare.judge.iloc[0]}." in text


def test_the_other_sections_read_their_files(artifacts):
    text = report.build(artifacts)
    diff = pd.read_csv(artifacts.compare_dir / "green_diff.csv")
    row = diff[(diff.split == "Testing") & (diff.region == "Lung")].iloc[0]
    assert (f"| run-b | run-a | Testing | Lung | {row.studies} | {row.difference:.3f} [{row.ci_lo:.3f}, "
            f"{row.ci_hi:.3f}] | {row.wins:.3f} |") in text
    nlg = pd.read_csv(artifacts.compare_dir / "nlg.csv").query("system == 'template' and split == 'test' and "
                                                               "region == 'report'").iloc[0]
    assert f"| template | test | {nlg['BLEU-1']:.3f} | {nlg['BLEU-2']:.3f} |" in text and "| n/a | " in text
    stats = pd.read_csv(artifacts.compare_dir / "green_stats.csv").query("system == 'run-a' and split == 'val'")
    assert f"| run-a | val | {stats.studies.max()} | {stats.scored.sum()} | {stats.unparseable.sum()} |" in text
    assert "not computed (CLINICAL = False)" in text and "not computed: notebook 03 with GROUNDING_STUDIES" in text
    method = text[text.index("### run-a\n\n| setting"):]
    config = artifacts.run("run-a").config
    assert f"| effective batch | {config['batch_size'] * config['grad_accum']} ({config['batch_size']} x " in method
    assert f"| LoRA r / alpha / dropout | {config['lora']['r']} / {config['lora']['alpha']} / " in method
    # the model, its family (config.model_type) and size (counted on the meta device), as make_config recorded them
    assert (f"| model | {config['model_id']} |\n| family | llava_next |\n"
            f"| size | {config['parameters'] / 1e6:.2f} M parameters |") in method
    assert "| 1: frozen_vision | 2 | 0.0002 | 40 | 1.50 | 11.5000 | checkpoint-30 | 1.2340 |" in method
    assert "| 2: vision_lora | 1 | 0.0001 | 20 | 0.50 | 12.2500 | last | 1.1000 |" in method
    assert re.search(r"transformers \d+\.\d+", text) and report.DEMO_NOTE not in text
    assert "the numbers mean nothing" in report.build(artifacts, demo=True)


def test_written_with_the_grounding_check_when_there_is_one(artifacts):
    table = pd.DataFrame([{"system": "run-a", "ablation": a, "region": "Whole report", "studies": 6,
                           "unchanged": 1.0, "GREEN": 0.5, "GREEN real": 0.5, "difference": 0.0, "ci_lo": 0.0,
                           "ci_hi": 0.0} for a in grounding.ABLATIONS])
    grounding.write_outputs(table, artifacts)
    (artifacts.compare_dir / "clinical.csv").write_text(  # clinical.write_outputs' layout
        "system,split,Studies,SembScore,SembScore lo,SembScore hi,Checkpoints\nrun-a,Testing,6,0.5,0.4,0.6,hub\n")
    path = report.write(artifacts, demo=True)
    text = path.read_text()
    assert path == artifacts.compare_dir / "report.md" and text.startswith("# Chest X-ray report generation")
    assert ("run-a does not look at the X-ray: it writes the same report for all 6 test studies with blank views and "
            "with another study's views.") in text
    assert "| run-a | blank | Whole report | 6 | 1.000 | 0.500 | 0.500 | 0.000 [0.000, 0.000] |" in text
    assert ("| system | split | Studies | SembScore | Checkpoints |\n|---|---|---|---|---|\n"
            "| run-a | Testing | 6 | 0.500 [0.400, 0.600] | hub |") in text
