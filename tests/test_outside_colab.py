"""What breaks outside the default Colab image: torch 2.8/2.9 with TRL's fused head, GPUs below Triton's floor,
several GPUs in one process, a NaN while sampling, DPO's growing hooks (in the tile and anyres modes, 4-bit with bf16
compute), a blank val report, and transformers' load report in the base mode.

No GPU exists here: where a test needs one, `torch.cuda` or `settings.gpu` is mocked, and the test says so."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl.kernels import chunked_logprob

from conftest import ROOT
from helpers.core import data, runs, settings
from helpers.splitting import regions
from helpers.model import generation, modeling
from helpers.train import fixes, preference, training
from test_preference import dpo_config, fake_judge


@pytest.mark.parametrize("version,works", [("2.7.1", True), ("2.8.0", False), ("2.9.1+cu128", False),
                                           ("2.10.0", True), ("2.11.0+cu130", True), (torch.__version__, True)])
def test_trl_fp32_addmm_only_where_torch_takes_it(version, works):
    assert fixes.addmm_out_dtype_works(version) == works


def test_importing_training_under_torch_2_9_turns_off_trl_fp32_addmm():
    """A fresh interpreter whose torch says 2.9.1 (the CUDA check itself cannot run here); today's stays as TRL set it."""
    code = ("import torch; torch.__version__ = torch.torch_version.TorchVersion('2.9.1+cu128'); "
            "import helpers.train.training; "
            "from trl.kernels import chunked_logprob; print(chunked_logprob._MM_OUT_DTYPE)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert chunked_logprob._MM_OUT_DTYPE is True  # imported here (torch 2.13): unchanged


def test_fused_head_takes_torch_below_compute_capability_8(monkeypatch):
    """The capability is passed in (mocked GPU): below 8.0 TRL's torch tiles, from 8.0 its Triton kernels."""
    trl_own = chunked_logprob._use_triton
    monkeypatch.setattr(chunked_logprob, "_use_triton", trl_own)  # restored after the test
    assert fixes.configure_fused_head("2.13.0", (8, 0)) == "triton"
    assert chunked_logprob._use_triton is trl_own
    path = fixes.configure_fused_head("2.13.0", (7, 5))
    assert path.startswith("torch (compute capability 7.5")
    assert chunked_logprob._use_triton(torch.device("cuda")) is False


def test_two_visible_gpus_stop_setup_without_a_launcher(monkeypatch, tmp_path, sample_dir):
    """Mocked: two CUDA devices (a T4 each)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(settings, "gpu", lambda: ("Tesla T4", 14.7, (7, 5)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=0") as error:
        settings.setup("t4", sample_dir, tmp_path)
    assert "torchrun --nproc-per-node 2" in str(error.value)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: one GPU per process
    resolved = settings.setup("t4", sample_dir, tmp_path)
    assert "fused_lm_head: torch (compute capability 7.5 is below Triton's 8.0)" in str(resolved)


def test_a_nan_while_sampling_drops_that_sample_only(model_and_processor, sample_studies):
    """One row's next-token scores turn NaN (an fp16 overflow on a T4): that sample is left out, the others are drawn,
    and nothing raises (today's multinomial raised for the whole batch)."""
    model, processor = model_and_processor
    views = [data.study_images(s, 1) for s in data.by_split(sample_studies, "test")[:2]]
    clean = generation.sample_batch(model, processor, views, n=2, temperature=1.0, max_new_tokens=4, seed=3)

    def first_row_nan(module, inputs, output):
        output[0] = float("nan")
        return output

    hook = model.lm_head.register_forward_hook(first_row_nan)
    try:
        sampled = generation.sample_batch(model, processor, views, n=2, temperature=1.0, max_new_tokens=4, seed=3)
    finally:
        hook.remove()
    assert [len(s) for s in sampled] == [1, 2]
    assert sampled[1] == clean[1]  # the other study's samples are the same draws


class HooksPerStep(TrainerCallback):
    """The forward hooks on the input embeddings after each preference step."""

    def __init__(self):
        self.counts = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if args.output_dir.endswith("preference"):
            self.counts.append(len(model.get_input_embeddings()._forward_hooks))


@pytest.mark.parametrize("mode", ["tile", "anyres"])
def test_dpo_in_tile_and_anyres_4bit_keeps_one_set_of_hooks(mode, tiny_model_dir, sample_studies, tmp_path,
                                                            monkeypatch):
    """The preference stage after one SFT stage, 4-bit nf4 with bf16 compute, one pair per DPO step (batch 1)."""
    green, _ = fake_judge(tmp_path, monkeypatch)
    stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage_dpo"][1:]]
    config = dpo_config(tiny_model_dir, green, stages=stages, visual_tokens=mode, load_in_4bit=True,
                        precision="bf16", batch_size=1, grad_accum=1, save_steps=8, max_views=2, target_tokens_max=6,
                        preference={**preference.preference_settings(judge=green.label, candidates=2), "min_gap": 0.0})
    train = data.by_split(sample_studies, "train")
    hooks = HooksPerStep()
    metrics = training.train(runs.Artifacts(tmp_path).run(mode), config, train[:2], train[2:3], callbacks=[hooks],
                             judge=green)
    record = metrics["stages"][1]
    assert record["name"] == "preference" and record["global_step"] >= 2 and "error" not in record["holdout_nlg"]
    assert len(hooks.counts) >= 2 and len(set(hooks.counts)) == 1, hooks.counts


def test_a_blank_val_report_is_named_and_counted(capsys):
    split = regions.split_many({"CXR1": "The lungs are clear. Heart size normal.", "CXR2": "  \n", "CXR3": ""},
                               backend="rules", progress=False)
    assert split.blank == ["CXR2", "CXR3"] and split.regions["CXR2"] == dict.fromkeys(data.ALL_REGIONS, "")
    assert split.regions["CXR1"]["lung"] and "2 blank" in split.summary()
    assert "CXR2, CXR3" in capsys.readouterr().out


def test_a_base_mode_load_prints_no_load_report(tiny_model_dir, capfd):
    model, _ = modeling.load_model_and_processor(str(tiny_model_dir), visual_tokens="base")
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    assert not hasattr(model.model, "image_newline")  # the key is really unused in this mode
    checkpoint = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "llava_next"
    head = next(v for k, v in checkpoint.items() if k.endswith("lm_head.weight"))
    assert torch.equal(model.lm_head.weight, head)  # transformers' renames still apply: loaded, not initialised
