"""`make demo` end to end: the four notebooks in order (02 and 03 once per preset), each reading what the one before
wrote, in each visual-token mode."""
import json

import pandas as pd
import pytest

from helpers import modeling, reports, runs
from helpers.run_notebooks import DEMO_RUNS, NOTEBOOKS_DIR, main

# what a quiet start leaves out of the executed notebooks: tqdm without widgets, the kernel's plain-TCP warning,
# deprecations of the libraries' APIs, the HF Trainer's raw log dicts (the loss is in metrics.json and the plot)
NOISE = ["IProgress not found", "without encryption", "FutureWarning", "{'loss'", "'train_runtime'"]
WIDGET = "application/vnd.jupyter.widget-view+json"


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


@pytest.mark.parametrize("mode", modeling.VISUAL_TOKENS)
def test_the_four_notebooks_run_in_order_on_the_sample(tmp_path, sample_dir, mode):
    names = sorted(p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert names == ["01_region_prompting.ipynb", "02_sft_lora_qlora.ipynb", "03_generate.ipynb",
                     "04_green_eval.ipynb"]
    assert main(["--out", str(tmp_path), "-p", "VISUAL_TOKENS", mode]) == 0  # what make demo VISUAL_TOKENS=... runs
    check_executed(tmp_path / "executed")

    val_ids = {e["id"] for e in json.loads((sample_dir / "annotation.json").read_text())["val"]}
    assert set(json.loads((tmp_path / "regions" / "val_regions.json").read_text())) == val_ids
    artifacts = runs.Artifacts(tmp_path)
    compared = artifacts.find_runs()
    assert [r.name for r in compared] == list(DEMO_RUNS)  # two presets, in the order trained
    for run in compared:
        config, metrics = run.config, json.loads(run.metrics_path.read_text())
        assert run.trained and config["preset"] == DEMO_RUNS[run.name]
        assert config["instruction"] == reports.INSTRUCTION and config["visual_tokens"] == mode
        assert all(set(stage["holdout_nlg"]) >= {"BLEU-4", "ROUGE-L", "CIDEr"} for stage in metrics["stages"])
        for split, n in (("val", 4), ("test", 4)):
            assert len(run.predictions(split).read_text().splitlines()) == n
        # one visual-share plot per analysed study (heatmaps need region tokens, which a random model may not write)
        attention_pngs = {p.name for p in run.attention_dir.glob("*.png")}
        assert "confidence.png" in attention_pngs and sum(n.endswith("_visual_share.png") for n in attention_pngs) == 3
        table = pd.read_csv(run.eval_dir / "green_table.csv", index_col=0)
        assert list(table.index) == ["Validation", "Testing"]
        assert list(table.columns) == ["Lung", "Heart", "Mediastinal", "Bone", "Mean", "Whole report"]
    compare = pd.read_csv(artifacts.compare_dir / "green_compare.csv", index_col=[0, 1])
    assert set(compare.index.get_level_values(0)) == {*DEMO_RUNS, "template", "retrieval"}
    assert set(pd.read_csv(artifacts.compare_dir / "green_diff.csv").run) == {"demo-qlora"}
    nlg = pd.read_csv(artifacts.compare_dir / "nlg.csv")
    assert len(nlg) == 4 * 2 * 5 and nlg["BLEU-1"].notna().any()  # systems x splits x (regions + whole report)


def test_unknown_parameter_is_refused():
    with pytest.raises(SystemExit):
        main(["-p", "VISUAL_TOKEN", "tile", "02_sft_lora_qlora.ipynb"])
