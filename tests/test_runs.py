"""The artifact layout: one owner of every path, and one rule (with one clear error) for finding a run."""
import json
import time

import pytest

from helpers.core import runs


def make_run(artifacts, name, trained=True, predictions=True):
    run = artifacts.run(name)
    run.train_dir.mkdir(parents=True)
    run.config_path.write_text(json.dumps({"model_id": "m"}))
    if trained:
        run.adapter_dir.mkdir()
        (run.adapter_dir / "adapter_config.json").write_text("{}")
    if predictions:
        for split in runs.SPLIT_NAMES:
            run.predictions(split).parent.mkdir(parents=True, exist_ok=True)
            run.predictions(split).write_text("")
    time.sleep(0.01)  # distinct modification times: runs are listed oldest first
    return run


def test_layout(tmp_path):
    artifacts = runs.Artifacts(tmp_path)
    run = artifacts.run("r")
    assert run.adapter_dir == tmp_path / "train" / "r" / "adapter"
    assert run.predictions("val") == tmp_path / "generate" / "r" / "predictions_val.jsonl"
    assert run.eval_dir == tmp_path / "eval" / "r" and artifacts.judge_cache == tmp_path / "eval" / "green_cache.jsonl"
    assert artifacts.split_annotation == tmp_path / "regions" / "annotation_with_val.json"


def test_find_run_has_one_rule_and_says_what_to_do(tmp_path):
    artifacts = runs.Artifacts(tmp_path)
    with pytest.raises(FileNotFoundError, match="no trained run yet: train one with notebook 02"):
        artifacts.find_run()
    with pytest.raises(FileNotFoundError, match="no predictions yet: run notebook 03"):
        artifacts.find_runs()
    first = make_run(artifacts, "first", predictions=False)
    assert artifacts.find_run() == first
    with pytest.raises(FileNotFoundError, match="no predictions yet: run notebook 03"):
        artifacts.find_runs()
    make_run(artifacts, "second")
    make_run(artifacts, "untrained", trained=False, predictions=False)
    with pytest.raises(ValueError, match=r"several runs: set RUN_NAME to one of \['first', 'second'\]"):
        artifacts.find_run()
    assert artifacts.find_run("first").name == "first"
    with pytest.raises(FileNotFoundError, match=r"run 'untrained' is not trained: .* \['first', 'second'\]"):
        artifacts.find_run("untrained")
    assert [r.name for r in artifacts.runs()] == ["first", "second", "untrained"]


def test_find_runs_lists_runs_with_predictions_in_the_order_trained(tmp_path):
    artifacts = runs.Artifacts(tmp_path)
    make_run(artifacts, "b")
    make_run(artifacts, "a")
    copied = artifacts.run("copied")  # predictions without a train folder (brought from elsewhere): last
    for split in runs.SPLIT_NAMES:
        copied.predictions(split).parent.mkdir(parents=True, exist_ok=True)
        copied.predictions(split).write_text("")
    assert [r.name for r in artifacts.find_runs()] == ["b", "a", "copied"]
    assert [r.name for r in artifacts.find_runs(["a", "b"])] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match=r"no predictions yet for \['c'\]: run notebook 03 .* \['b', 'a', "):
        artifacts.find_runs(["a", "c"])
