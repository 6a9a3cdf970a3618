"""helpers/smoke.py: the smoke's studies, its folders apart from the real runs', and the projections' arithmetic."""
import json
import random
from types import SimpleNamespace

import pandas as pd
import pytest

from helpers.preflight import smoke

T4 = SimpleNamespace(gpu_name="Tesla T4", gpu_memory_gb=14.7, profile="t4", precision="fp16")


def studies(split, n):
    return [SimpleNamespace(id=f"CXR{i}_IM-{split}", split=split) for i in range(n)]


def test_eight_train_studies_two_held_out_four_val_four_test_from_the_ids_alone():
    train = studies("train", 40)
    fit, held = smoke.training_studies(train)
    assert (len(fit), len(held)) == (6, 2)
    shuffled = random.Random(0).sample(train, len(train))
    again = smoke.training_studies(shuffled)
    assert [{s.id for s in part} for part in again] == [{s.id for s in part} for part in (fit, held)]
    chosen = smoke.splits({"val": studies("val", 30), "test": studies("test", 30)})
    assert {k: len(v) for k, v in chosen.items()} == {"val": 4, "test": 4}
    # notebook 01 splits the reports of exactly the val studies notebooks 03 and 04 then take
    reports = {s.id: "text" for s in studies("val", 30)}
    assert set(smoke.val_reports(reports)) == {s.id for s in chosen["val"]}


def test_run_names():
    assert smoke.run_name("llava-two_stage", True) == "llava-two_stage-smoke"
    assert smoke.run_name("llava-two_stage-smoke", True) == "llava-two_stage-smoke"
    assert smoke.run_name("llava-two_stage", False) == "llava-two_stage"
    assert smoke.run_name(None, True) is None
    assert smoke.run_names(["a", "b"], True) == ["a-smoke", "b-smoke"] and smoke.run_names(None, True) is None


def test_smoke_and_real_runs_never_see_each_other(tmp_path):
    for name in ("real", "real-smoke"):
        (tmp_path / "train" / name / "adapter").mkdir(parents=True)
        (tmp_path / "train" / name / "config.json").write_text("{}")
        (tmp_path / "train" / name / "adapter" / "adapter_config.json").write_text("{}")
        (tmp_path / "generate" / name).mkdir(parents=True)
        for split in ("val", "test"):
            (tmp_path / "generate" / name / f"predictions_{split}.jsonl").write_text("")
    real, smoked = smoke.Artifacts(tmp_path), smoke.Artifacts(tmp_path, True)
    assert real.find_run().name == "real" and smoked.find_run().name == "real-smoke"
    assert [r.name for r in real.find_runs()] == ["real"] and [r.name for r in smoked.find_runs()] == ["real-smoke"]
    assert (real.regions_dir, smoked.regions_dir) == (tmp_path / "regions", tmp_path / "regions" / "smoke")
    assert smoked.judge_cache.parent == smoked.compare_dir.parent == tmp_path / "eval" / "smoke"
    assert real.judge_cache == tmp_path / "eval" / "green_cache.jsonl"


def test_no_smoke_run_yet_says_so(tmp_path):
    (tmp_path / "generate" / "real").mkdir(parents=True)
    for split in ("val", "test"):
        (tmp_path / "generate" / "real" / f"predictions_{split}.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="no smoke run"):
        smoke.Artifacts(tmp_path, True).find_runs()


def test_training_projection_from_the_stage_records():
    full_stages = [{"name": "frozen_vision", "epochs": 1}, {"name": "vision_lora", "epochs": 2}]
    fit, held = studies("train", 1000), studies("train", 53)
    config = {"batch_size": 1, "grad_accum": 8, "processes": 1, "n_train": 6,
              **smoke.training_config(fit, held, full_stages)}
    assert [s["epochs"] for s in config["stages"]] == [2, 2]
    # 6 studies x 2 epochs = 12 samples per stage: 5 s and 10 s per sample, 40 s and 80 s per optimizer step of 8
    metrics = {"stages": [{"seconds": 60.0, "global_step": 2, "resumed_from_step": 0},
                          {"seconds": 60.0, "global_step": 2, "resumed_from_step": 1}]}  # resumed: half the samples
    record = smoke.training_projection(T4, metrics, config)
    assert record["inputs"]["optimizer steps per epoch"] == 125  # ceil(1000 / 8)
    assert [s["seconds per optimizer step (measured)"] for s in record["inputs"]["stages"]] == [40.0, 80.0]
    assert (record["unit"], record["units in the full step"]) == ("optimizer step", 125 + 250)
    assert record["hours"] == round((125 * 40 + 250 * 80) / 3600, 3)  # 6.944
    assert record["projected from a smoke run"] and record["gpu"] == "Tesla T4 (14.7 GiB)"
    assert record["fits a 12-hour Colab session"]


def test_generation_and_judge_projections():
    full = {"val": studies("val", 296), "test": studies("test", 590)}
    speed = {"val": {"seconds": 20.0, "generated_now": 4}, "test": {"seconds": 20.0, "generated_now": 4}}
    record = smoke.generation_projection(T4, speed, full)
    assert (record["unit"], record["seconds per unit (measured)"]) == ("study", 5.0)
    assert record["units in the full step"] == 296 + 590
    assert record["hours"] == round(886 * 5 / 3600, 3)
    assert smoke.generation_projection(T4, {s: {**f, "generated_now": 0} for s, f in speed.items()}, full) is None

    # k1, k2 timed by the static loop (records without an engine are static's), k3 by continuous batching
    cache = {"k1": {"seconds": 3.0}, "k2": {"seconds": 5.0}, "k3": {"seconds": 1.0, "engine": "continuous"}}
    frame = pd.DataFrame({"key": ["k1", "k2", "k1", "k3"]})  # a pair judged once counts once
    record = smoke.judge_projection(T4, SimpleNamespace(store=SimpleNamespace(get=cache.get), engine="static"),
                                    frame, 1, full)
    assert record["units in the full step"] == (1 + 2) * 886 * 5  # before dedupe
    assert record["hours"] == round(13290 * 4.0 / 3600, 3) and not record["fits a 12-hour Colab session"]
    continuous = smoke.judge_projection(T4, SimpleNamespace(store=SimpleNamespace(get=cache.get),
                                                            engine="continuous"), frame, 1, full)
    assert continuous["hours"] == round(13290 * 1.0 / 3600, 3)  # the chosen engine's speed
    assert continuous["inputs"]["timed by the judge engine"] == "continuous"


def test_twelve_hour_verdict():
    assert "fits a 12-hour Colab session" in smoke.verdict("train", 12.0, "Tesla T4")
    line = smoke.verdict("train", 12.5, "Tesla T4")
    assert "12.50 h on Tesla T4" in line and "about 2 sessions" in line


def test_chain_summary_adds_the_steps_projected(tmp_path):
    artifacts = smoke.Artifacts(tmp_path, True)
    run = artifacts.run("r-smoke")
    for folder, hours in ((artifacts.regions_dir, 0.5), (run.train_dir, 9.0), (run.eval_dir, 4.0)):  # no generate
        smoke.write(folder / "projection.json", smoke.projection(folder.name, T4, unit="item", seconds_per_unit=hours,
                                                                 units=3600, inputs={}, leaves_out=""))
    summary = smoke.chain_summary(artifacts, run)
    assert summary.count(" h\n") == 3
    assert "together: projected at 13.50 h" in summary and "about 2 sessions" in summary


def test_write_keeps_an_earlier_projection_when_nothing_was_measured(tmp_path):
    path = tmp_path / "projection.json"
    record = smoke.projection("split", T4, unit="report", seconds_per_unit=1.0, units=3600, inputs={}, leaves_out="")
    assert smoke.write(path, record).startswith("split: projected at 1.00 h on Tesla T4 (14.7 GiB)")
    assert json.loads(path.read_text())["hours"] == 1.0
    assert "stays" in smoke.write(path, None) and json.loads(path.read_text())["hours"] == 1.0
