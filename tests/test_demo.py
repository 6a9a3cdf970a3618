"""`make demo` end to end: the four notebooks in order (02 and 03 once per preset), each reading what the one before
wrote (the session's `demo_chain`, default visual-token mode); then the smoke chain beside it in a second mode (the
third: test_third_visual_token_mode.py)."""
import hashlib
import json

import pandas as pd
import pytest
from test_report import check_demo_report

from helpers import commands
from helpers.core import report_format, runs
from helpers.model import modeling
from helpers.demo import tiny_models
from helpers.preflight import smoke
from helpers.model.modeling import load_for_inference, load_processor, training_chat_template
from helpers.run_notebooks import DEMO_RUNS, NOTEBOOKS_DIR, main

# what a quiet start leaves out of the executed notebooks: tqdm without widgets, the kernel's plain-TCP warning,
# deprecations of the libraries' APIs, the HF Trainer's raw log dicts (the loss is in metrics.json and the plot)
NOISE = ["IProgress not found", "without encryption", "FutureWarning", "{'loss'", "'train_runtime'"]
WIDGET = "application/vnd.jupyter.widget-view+json"
# the modes besides the default one: the smoke chain runs in the first, training and generation alone in the second
SMOKE_CHAIN_MODE, SMALLEST_CASE_MODE = (m for m in modeling.VISUAL_TOKENS if m != modeling.DEFAULT_VISUAL_TOKENS)


def check_executed(executed_dir):
    """No noise in any executed notebook; notebook 03's viewer, headless, fell back to static pictures."""
    paths = sorted(executed_dir.glob("*.ipynb"))
    assert any(p.name.startswith("03_") for p in paths)
    for path in paths:
        cells = json.loads(path.read_text())["cells"]
        outputs = json.dumps([c.get("outputs", []) for c in cells])
        assert not [n for n in NOISE if n in outputs], path.name
        if path.name.startswith("03_"):
            viewer = next(c for c in cells if "viewer.show_attention" in "".join(c["source"]))
            kinds = [kind for o in viewer["outputs"] for kind in o.get("data", {})]
            assert "image/png" in kinds and WIDGET not in kinds, path.name


def test_the_four_notebooks_run_in_order_on_the_sample(demo_chain, sample_dir):
    """`make demo`: the chain in the default visual-token mode (the `demo_chain` fixture runs it)."""
    names = sorted(p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert names == ["01_region_prompting.ipynb", "02_sft_lora_qlora.ipynb", "03_generate.ipynb",
                     "04_green_eval.ipynb"]
    mode = modeling.DEFAULT_VISUAL_TOKENS
    check_executed(demo_chain / "executed")

    val_ids = {e["id"] for e in json.loads((sample_dir / "annotation.json").read_text())["val"]}
    assert set(json.loads((demo_chain / "regions" / "val_regions.json").read_text())) == val_ids
    artifacts = runs.Artifacts(demo_chain)
    compared = artifacts.find_runs()
    assert [r.name for r in compared] == list(DEMO_RUNS)  # two presets, in the order trained
    for run in compared:
        check_run(run, mode, DEMO_RUNS[run.name])
        table = pd.read_csv(run.eval_dir / "green_table.csv", index_col=0)
        assert list(table.index) == ["Validation", "Testing"]
        assert list(table.columns) == ["Lung", "Heart", "Mediastinal", "Bone", "Mean", "Whole report", "judge"]
        # its id, precision and engine beside the scores
        assert table.judge.str.endswith(f"{tiny_models.DEMO_JUDGE_DIR} (fp32, continuous batching)").all()
        assert table.drop(columns="judge").notna().all().all()  # the demo judge writes GREEN's format: numbers
    compare = pd.read_csv(artifacts.compare_dir / "green_compare.csv", index_col=[0, 1])
    assert set(compare.index.get_level_values(0)) == {*DEMO_RUNS, "template", "retrieval"}
    assert set(pd.read_csv(artifacts.compare_dir / "green_diff.csv").run) == {"demo-two_stage_dpo"}
    nlg = pd.read_csv(artifacts.compare_dir / "nlg.csv")
    assert len(nlg) == 4 * 2 * 5 and nlg["BLEU-1"].notna().any()  # systems x splits x (regions + whole report)
    check_clinical(artifacts.compare_dir)
    check_preference(artifacts)
    check_demo_report(artifacts)  # eval/compare/report.md and grounding.csv (tests/test_report.py)


def test_notebook_02_writes_the_run_contract(demo_chain, sample_studies):
    """The chain's two_stage run: what notebooks 03 and 04 read from it, each stage's record, the vision LoRA left
    untouched by stage 1 and trained by stage 2, and the run loaded back for inference as it was trained."""
    from peft.utils import load_peft_weights

    run = runs.Artifacts(demo_chain).run("demo-two_stage")
    config = run.config
    for key in ("model_id", "load_in_4bit", "visual_tokens", "max_views", "max_length", "preset", "stages",
                "instruction", "holdout_ids"):
        assert key in config
    assert config["instruction"] == report_format.INSTRUCTION and config["model_id"].endswith("tiny-llava")
    assert set(config["holdout_ids"]) <= {s.id for s in sample_studies if s.split == "train"}
    metrics = json.loads(run.metrics_path.read_text())
    assert [s["name"] for s in metrics["stages"]] == ["frozen_vision", "vision_lora"]
    assert all(s["loss"] and s["eval_loss"] and s["seconds"] > 0 for s in metrics["stages"])
    # the cheap generation metric of each stage's selected weights, beside the held-out loss that selects them
    assert all(s["holdout_nlg"]["pairs"] == len(config["holdout_ids"]) and s["holdout_nlg"]["METEOR"] is None
               for s in metrics["stages"])

    def vision_b(folder):
        weights = load_peft_weights(str(folder))
        return [w for k, w in weights.items() if "vision_tower" in k and "lora_B" in k]

    assert all((w == 0).all() for w in vision_b(run.checkpoints_dir / "1_frozen_vision" / "final"))
    assert any((w != 0).any() for w in vision_b(run.adapter_dir))
    assert (run.train_dir / "loss.png").stat().st_size > 0
    model, processor, loaded = load_for_inference(run)
    assert loaded == config and processor.chat_template == training_chat_template(load_processor(config["model_id"]))


def test_the_smoke_chain_beside_the_real_runs(demo_chain):
    """SMOKE=True through the four notebooks into the demo's folder, in a second visual-token mode."""
    check_smoke_chain(demo_chain, SMOKE_CHAIN_MODE)


def check_run(run, mode: str, preset: str, attention_studies: int = 3):
    """A trained run in `mode` with its held-out checks, 4 + 4 predictions and one visual-share plot per analysed
    study (heatmaps need region tokens, which a random model may not write)."""
    config, metrics = run.config, json.loads(run.metrics_path.read_text())
    assert run.trained and config["preset"] == preset
    assert config["instruction"] == report_format.INSTRUCTION and config["visual_tokens"] == mode
    assert all(set(stage["holdout_nlg"]) >= {"BLEU-4", "ROUGE-L", "CIDEr"} for stage in metrics["stages"])
    for split, n in (("val", 4), ("test", 4)):
        lines = run.predictions(split).read_text().splitlines()
        assert len(lines) == n and all(set(json.loads(line)) >= {"id", "confidence"} for line in lines)
    attention_pngs = {p.name for p in run.attention_dir.glob("*.png")}
    assert "confidence.png" in attention_pngs
    assert sum(n.endswith("_visual_share.png") for n in attention_pngs) == attention_studies


def check_clinical(compare_dir):
    """RadEval's metrics for every run and baseline on both splits, with intervals and paired differences."""
    table = pd.read_csv(compare_dir / "clinical.csv", index_col=[0, 1])
    assert set(table.index) == {(s, split) for s in (*DEMO_RUNS, "template", "retrieval")
                                for split in ("Validation", "Testing")}
    for column in ("CheXbert F1 micro-14", "CheXbert F1 macro-14", "CheXbert F1 micro-5", "CheXbert F1 macro-5",
                   "RadGraph F1"):
        assert table[column].notna().all() and {f"{column} lo", f"{column} hi"} <= set(table.columns)
    assert (table.Checkpoints == "random stand-ins: meaningless").all()
    diff = pd.read_csv(compare_dir / "clinical_diff.csv")
    assert set(diff.run) == {"demo-two_stage_dpo"} and set(diff.reference) == {"demo-two_stage"}
    assert (compare_dir / "rexrank_iu_xray.csv").read_text().startswith("# Comparable with ReXrank")
    assert (compare_dir / "plots" / "clinical.png").stat().st_size > 0


def check_preference(artifacts):
    """The two_stage_dpo run trained on at least one pair, and notebook 04 set it against its SFT counterpart by
    what it optimises and what it does not, length and distinct reports included."""
    run = artifacts.run("demo-two_stage_dpo")
    pairs = [json.loads(line) for line in run.preferences_path.read_text().splitlines()]
    assert pairs and all(p["chosen_reward"] - p["rejected_reward"] >= run.config["preference"]["min_gap"]
                         for p in pairs)
    stage = json.loads(run.metrics_path.read_text())["stages"][-1]
    assert stage["name"] == "preference" and stage["preference"]["pairs"] == len(pairs) and stage["global_step"] >= 1
    comparison = pd.read_csv(artifacts.compare_dir / "preference_vs_sft.csv")
    assert set(comparison.run) == {run.name} and set(comparison["sft counterpart"]) == {"demo-two_stage"}
    measures = set(comparison.measure)
    assert {"GREEN Whole report", "CIDEr (whole report)", "CheXbert F1 micro-14", "mean words",
            "distinct reports"} <= measures
    assert comparison[comparison.measure.str.startswith("GREEN")]["optimised by DPO"].all()
    assert not comparison[~comparison.measure.str.startswith("GREEN")]["optimised by DPO"].any()
    lengths = pd.read_csv(artifacts.compare_dir / "report_lengths.csv", index_col=[0, 1])
    assert set(lengths.index.get_level_values(0)) == {*DEMO_RUNS, "template", "retrieval"}
    assert lengths.loc[("template", "Testing"), "distinct reports"] == 1  # one fixed report


def file_digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "executed"}


def check_smoke_chain(root, mode):
    """SMOKE=True through the four notebooks (02 and 03 once, in `mode`): every step writes its projection.json in its smoke
    folder, and not one byte of the real runs' files changes; `python -m helpers train --smoke` finds the same run."""
    before = file_digests(root)
    assert main(["--out", str(root), "-p", "VISUAL_TOKENS", mode, "-p", "SMOKE", "True", "-p", "METEOR", "False",
                 "-p", "CLINICAL", "False"]) == 0
    check_executed(root / "executed")
    after = file_digests(root)
    assert {path: after.get(path) for path in before} == before  # the real runs' files, byte for byte
    run = smoke.Artifacts(root, True).run("demo-two_stage_dpo-smoke")
    smoke_dirs = [root / "regions" / "smoke", root / "eval" / "smoke", run.train_dir, run.generate_dir, run.eval_dir]
    assert all(any((root / path).is_relative_to(d) for d in smoke_dirs) for path in set(after) - set(before))
    for folder in (root / "regions" / "smoke", run.train_dir, run.generate_dir, run.eval_dir):
        projection = json.loads((folder / "projection.json").read_text())
        assert projection["projected from a smoke run"] and projection["hours"] >= 0, folder
    config = run.config
    assert config["n_train"] == 6 and len(config["holdout_ids"]) == 2 and config["full_run"]["n_train"] == 14
    check_run(run, mode, "two_stage_dpo", attention_studies=1)  # its three stages in `mode`, 4 + 4 predictions
    preference_stage = json.loads((run.train_dir / "projection.json").read_text())["inputs"]["stages"][-1]
    assert set(preference_stage["preference phases"]) == {"sampling", "judging"}
    compare = pd.read_csv(root / "eval" / "smoke" / "compare" / "green_compare.csv", index_col=[0, 1])
    assert set(compare.index.get_level_values(0)) == {run.name}  # no baselines in a smoke run
    # the command builds the notebook's smoke config: the same run, already trained (a different one is refused)
    projection = (run.train_dir / "projection.json").read_bytes()
    assert commands.main(["train", "--smoke", "--profile", "demo", "--artifacts-dir", str(root),
                          "--run-name", "demo-two_stage_dpo", "--preset", "two_stage_dpo",
                          "--visual-tokens", mode]) == 0
    assert (run.train_dir / "projection.json").read_bytes() == projection


def test_unknown_parameter_is_refused():
    with pytest.raises(SystemExit):
        main(["-p", "VISUAL_TOKEN", "tile", "02_sft_lora_qlora.ipynb"])
