"""A trained-looking run in seconds for the predict and Hub tests: notebook 02's config.json and its adapter folder
(processor + PEFT adapter) as `training.train` saves them, with the LoRA and projector weights drawn at random
instead of trained, so the adapter changes what the tiny model writes."""
import json

import torch

from helpers.core import runs
from helpers.train import training
from helpers.core.settings import setup


def make_run(artifacts_root, model_dir, data_dir, name: str = "tiny") -> runs.Run:
    config = training.make_config(setup("demo", data_dir, artifacts_root), model_id=str(model_dir), max_length=512,
                                  preset="two_stage", max_views=3, target_tokens_max=16)
    run = runs.Artifacts(artifacts_root).run(name)
    model, processor = training.load_training_model(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name or "modules_to_save" in parameter_name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    processor.save_pretrained(run.adapter_dir)
    model.save_pretrained(run.adapter_dir)
    run.config_path.write_text(json.dumps({**config, "n_train": 0, "holdout_ids": []}))
    return run
