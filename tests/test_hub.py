"""Sharing a run: `python -m helpers push --dry-run` writes train/<run>/hub/, which loads onto the base model with
PEFT alone and writes the run's reports. The Hub cannot be reached from here: only the two upload calls of
huggingface_hub (create_repo, upload_folder) are replaced by recorders; everything before them runs for real."""
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from tiny_run import make_run

from helpers import commands
from helpers.core import data, runs
from helpers.model import generation, modeling
from helpers.evaluate import hub, report
from helpers.core.data import by_split
from helpers.core.errors import UserError


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, sample_dir):
    return make_run(tmp_path_factory.mktemp("artifacts"), tiny_model_dir, sample_dir)


def test_dry_run_folder_loads_with_peft_and_writes_the_runs_reports(run, sample_studies, capsys):
    commands.main(["push", "--profile", "demo", "--artifacts-dir", str(run.artifacts_dir), "--run-name", run.name,
                   "--repo-id", "someone/xray-rrg-tiny", "--dry-run"])
    folder = run.train_dir / "hub"
    assert f"dry run: wrote {folder}" in capsys.readouterr().out
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json",
            "README.md", "training"} <= {p.name for p in folder.iterdir()}
    assert (folder / "training" / "config.json").read_text() == run.config_path.read_text()

    views = [data.study_images(s, 3) for s in by_split(sample_studies, "test")[:2]]
    ids = ["a", "b"]
    model, processor, config = modeling.load_for_inference(run)
    expected = generation.generate_batch(model, processor, views, ids, max_new_tokens=12)
    base, base_processor = modeling.load_model_and_processor(config["model_id"], visual_tokens=config["visual_tokens"],
                                                             processor_id=str(folder))
    inputs = modeling.generation_inputs(base_processor, views[:1], base)
    with torch.inference_mode():
        without_adapter = base(**inputs).logits
    shared = PeftModel.from_pretrained(base, folder).eval()
    with torch.inference_mode():
        assert not torch.allclose(shared(**inputs).logits, without_adapter)  # the adapter is what writes
    assert generation.generate_batch(shared, base_processor, views, ids, max_new_tokens=12) == expected


def test_model_card_has_the_hub_metadata_the_warning_and_the_loading_code(run):
    folder = hub.prepare(run, runs.Artifacts(run.artifacts_dir), "someone/xray-rrg-tiny")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == run.config["model_id"] and card.data.library_name == "peft"
    # the base model named with its family and size, as make_config recorded them
    assert (f"`{run.config['model_id']}` (family `llava_next`, {report.size_in_words(run.config['parameters'])})"
            in card.text)
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.datasets and "radiology" in card.data.tags
    assert "Research use only, not for clinical decisions." in card.text
    assert 'snapshot_download("someone/xray-rrg-tiny")' in card.text and "PeftModel.from_pretrained" in card.text
    assert "Not evaluated yet" in card.text  # no notebook 04 in this artifact folder
    assert report.DEMO_NOTE in card.text  # a demo-profile run: its numbers mean nothing


def test_push_uploads_the_folder_with_the_token_and_refuses_without_one(run, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, self.token,
                                                                                       kw)) or f"hf.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"],
                                                                                 kw["folder_path"])))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    artifacts = runs.Artifacts(run.artifacts_dir)
    with pytest.raises(UserError, match="HF_TOKEN is not set"):
        hub.push(run, artifacts, "someone/xray-rrg-tiny")
    assert calls == []
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert hub.push(run, artifacts, "someone/xray-rrg-tiny", private=True) == "hf.co/someone/xray-rrg-tiny"
    assert calls == [("create", "someone/xray-rrg-tiny", "hf_test_token", {"private": True, "exist_ok": True}),
                     ("upload", "someone/xray-rrg-tiny", run.train_dir / "hub")]
