"""Share a trained run on the Hugging Face Hub through `huggingface_hub`: its adapter and processor (the adapter
folder notebook 02 saved), its config.json and metrics.json (under training/), and a model card with the report's
tables. `--dry-run` writes the folder to train/<run>/hub/ and stops."""
from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..core.colab import REPO_URL
from .green import markdown_table
from .report import DEMO_NOTE, green_tables, method, read_compare, size_in_words
from ..core.errors import MissingError, UserError
from ..core.settings import get_secret

TAGS = ["medical", "radiology", "chest-x-ray", "radiology-report-generation", "llava-next", "lora", "peft"]
DATASETS = ["IU X-Ray (Indiana University chest X-ray collection, R2Gen's annotation split)"]


def hub_dir(run) -> Path:
    return run.train_dir / "hub"


def results(run, artifacts) -> str:
    """The run's GREEN table as report.md has it (eval/compare/green_compare.csv), or why there is none yet."""
    path = artifacts.compare_dir / "green_compare.csv"
    tables = green_tables(read_compare(artifacts)) if path.is_file() else {}
    if run.name not in tables:
        return "Not evaluated yet: notebook 04 (`python -m helpers evaluate`) writes the tables, then push again."
    judge = ", ".join(read_compare(artifacts).judge.unique())
    return (f"Headline GREEN per region (judge {judge}; mean over the studies whose reference for the region is "
            f"non-empty; 95% bootstrap intervals), from `eval/compare/report.md`:\n\n"
            f"{markdown_table(*tables[run.name])}")


def model_card(run, artifacts, repo_id: str) -> ModelCard:
    config = run.config
    data = ModelCardData(base_model=config["model_id"], library_name="peft", pipeline_tag="image-text-to-text",
                         datasets=DATASETS, tags=TAGS)
    demo = f"\n{DEMO_NOTE}\n" if config.get("profile") == "demo" else ""
    size = f", {size_in_words(config['parameters'])}" if config.get("parameters") else ""
    family = f" (family `{config['family']}`{size})" if config.get("family") else ""
    body = f"""
# {repo_id}

A LoRA adapter for [{config['model_id']}](https://huggingface.co/{config['model_id']}) that writes the findings of a
chest X-ray study (1 to {config['max_views']} views) as four lines: Lung, Heart, Mediastinal, Bone. Base model:
`{config['model_id']}`{family}. Trained with [{REPO_URL}]({REPO_URL}) (run `{run.name}`, preset `{config['preset']}`).

**Research use only, not for clinical decisions.** It was trained on one small public data set, makes mistakes a
radiologist would not, and has not been validated clinically.
{demo}

## Results

{results(run, artifacts)}

## How to load and generate

The adapter goes on the base model loaded through the project's code: with visual tokens `{config['visual_tokens']}`
the base checkpoint is loaded in that mode (`modeling.model_config`), which plain `from_pretrained` does not do.

```python
# git clone {REPO_URL} && cd xray-rrg && pip install -r requirements.txt
import json
from huggingface_hub import snapshot_download
from peft import PeftModel
from helpers.core import data, report_format
from helpers.model import generation, modeling

folder = snapshot_download("{repo_id}")
config = json.load(open(f"{{folder}}/training/config.json"))
model, processor = modeling.load_model_and_processor(config["model_id"], visual_tokens=config["visual_tokens"],
                                                     processor_id=folder)
model = PeftModel.from_pretrained(model, folder).eval()
views = [data.open_image(path, "my-study") for path in ["frontal.png", "lateral.dcm"]]  # PNG, JPEG or DICOM
record = generation.generate_batch(model, processor, [views], ["my-study"], max_new_tokens=256)[0]
print(report_format.format_report(record["regions"]))
```

With the repository, `python -m helpers predict --run-name RUN frontal.png lateral.dcm` does the same for a run in
`ARTIFACTS_DIR` and saves an attention overlay per view.

## Training data

IU X-Ray (the Indiana University chest X-ray collection) in R2Gen's train / val / test split, its reports split
into lung, heart, mediastinal, bone and other findings: {config.get('n_train', 'n/a')} train studies,
{len(config.get('holdout_ids', []))} of the train studies held out for model selection.

## Training

{method(run)}

`training/config.json` and `training/metrics.json` hold every setting and the training record.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def prepare(run, artifacts, repo_id: str) -> Path:
    """train/<run>/hub/, written afresh: the adapter folder (weights, adapter_config.json, processor), training/ with
    config.json and metrics.json, and README.md, the model card."""
    if not run.trained:
        raise MissingError(f"{run.adapter_dir}: no trained adapter; finish notebook 02 for run {run.name!r}")
    folder = hub_dir(run)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(run.adapter_dir, folder)
    (folder / "training").mkdir()
    for path in (run.config_path, run.metrics_path):
        if path.is_file():
            shutil.copy2(path, folder / "training" / path.name)
    model_card(run, artifacts, repo_id).save(folder / "README.md")  # replaces the card PEFT wrote
    return folder


def push(run, artifacts, repo_id: str, *, dry_run: bool = False, private: bool = False) -> str:
    """Upload train/<run>/hub/ to `repo_id` (a model repository, created if missing) with HF_TOKEN; returns the
    repository's address, or with `dry_run` the folder it would upload."""
    folder = prepare(run, artifacts, repo_id)
    if dry_run:
        return str(folder)
    token = get_secret("HF_TOKEN")
    if not token:
        raise UserError("HF_TOKEN is not set: add a write token to Colab's secrets or the environment")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"{run.name}: adapter, processor, "
                                                                          f"config and model card")
    return str(url)
