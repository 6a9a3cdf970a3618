"""The one settings step: profile from the GPU's memory, precision from its capability, what each notebook gets."""
import pytest

from helpers.core import settings
from helpers.core.settings import pick_profile, precision_for


def test_pick_profile_by_gpu_memory():
    assert pick_profile(14.7, (7, 5)) == "t4"  # T4 as torch reports it
    assert pick_profile(22.2, (8, 9)) == "l4"
    assert pick_profile(39.4, (8, 0)) == "a100"  # A100-40GB
    assert pick_profile(79.1, (9, 0)) == "a100"
    assert pick_profile(None, None) == "demo"
    assert [pick_profile(m, (8, 0)) for m in (19.9, 20.0, 34.9, 35.0)] == ["t4", "l4", "l4", "a100"]


def test_precision_follows_capability():
    assert [precision_for(c) for c in ((7, 5), (8, 0), (9, 0), None)] == ["fp16", "bf16", "bf16", "fp32"]


@pytest.mark.parametrize("memory,capability,judge_4bit", [(14.7, (7, 5), True), (22.2, (8, 9), False),
                                                          (39.4, (8, 0), False), (79.1, (9, 0), False)])
def test_the_judge_runs_as_green_runs_it(monkeypatch, tmp_path, memory, capability, judge_4bit):
    """GREEN's fp16 on every GPU, whatever its bf16 support; 4-bit only where fp16 weights cannot fit (a T4); answers
    run to GREEN's 2,048-token total."""
    monkeypatch.setattr(settings, "gpu", lambda: ("GPU", memory, capability))
    resolved = settings.resolve(None, tmp_path, tmp_path)
    assert (resolved.judge_4bit, resolved.judge_precision) == (judge_4bit, "fp16")
    assert resolved.judge_max_new_tokens == settings.GREEN_TOKEN_BUDGET == 2048
    demo = settings.resolve("demo")
    assert (demo.judge_4bit, demo.judge_precision) == (False, "fp32")


@pytest.mark.parametrize("memory,capability,profile,inference_4bit,precision", [
    (14.7, (7, 5), "t4", True, "fp16"), (22.2, (8, 9), "l4", True, "bf16"), (39.4, (8, 0), "a100", False, "bf16")])
def test_settings_for_each_gpu(monkeypatch, tmp_path, memory, capability, profile, inference_4bit, precision):
    monkeypatch.setattr(settings, "gpu", lambda: ("GPU", memory, capability))
    resolved = settings.resolve(None, tmp_path, tmp_path)
    assert (resolved.profile, resolved.inference_4bit, resolved.precision) == (profile, inference_4bit, precision)
    assert resolved.load_in_4bit == (profile != "a100")  # QLoRA below 35 GiB
    assert (resolved.batch_size, resolved.grad_accum) == ((4, 2) if profile == "a100" else (1, 8))


def test_demo_and_unknown_profiles(tmp_path):
    demo = settings.resolve("demo")
    assert demo.offline and demo.precision == "fp32" and not demo.inference_4bit
    assert demo.data_dir == settings.REPO_ROOT / "data" / "sample"
    with pytest.raises(ValueError, match="unknown PROFILE 'colab'"):
        settings.resolve("colab")
    with pytest.raises(FileNotFoundError, match="annotation.json not found"):
        settings.setup("demo", data_dir=tmp_path)


def test_the_issue_facing_names_are_reexported():
    import helpers
    from helpers.model import modeling
    from helpers.metrics import nlg

    assert helpers.pick_profile is pick_profile and helpers.setup is settings.setup
    assert helpers.visual_tokens_per_view is modeling.visual_tokens_per_view
    assert helpers.nlg_metrics is nlg.nlg_metrics
