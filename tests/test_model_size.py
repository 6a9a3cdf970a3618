"""Settings by model size: 4-bit and the batch from the parameter count (counted from the config on the meta device)
and the GPU's memory; the free-T4 plan's computed hours and README's cost table from the same functions; a run's
model, family and size in report.md's method and the model card (tests/test_report.py, tests/test_hub.py); the
retrieval embeddings of a SigLIP tower without its pooling head.

No GPU here: a GPU is emulated by its memory (`settings.gpu` mocked, or `gpu_memory_gb` replaced), as
tests/test_profile_emulation.py does. The two sizes are the real architectures' configs alone
(helpers/preflight/cost.py): sizing reads nothing else, so no weights are needed.
"""
from dataclasses import replace

import pytest
import torch
from test_profile_emulation import DEFAULT_PARAMETERS

from helpers.core import settings
from helpers.preflight import cost
from helpers.train import recipe, training
from helpers.core.settings import REPO_ROOT

T4, L4, A100 = 14.7, 22.2, 39.4  # GiB as torch reports them
SMALL = 894_443_584  # llava-interleave-qwen-0.5b's architecture, counted below


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    for size, spec in cost.SIZES.items():
        spec["config"]().save_pretrained(root / size)
    return root


def test_parameters_are_counted_from_the_config_alone(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText

    built = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert settings.parameter_count(config) == sum(p.numel() for p in built.parameters())
    assert (settings.parameter_count(config, "model.vision_tower")
            == sum(p.numel() for p in built.model.vision_tower.parameters()))
    assert [settings.parameter_count(spec["config"]()) for spec in cost.SIZES.values()] == [SMALL, DEFAULT_PARAMETERS]


@pytest.mark.parametrize("memory,capability", [(T4, (7, 5)), (L4, (8, 9)), (A100, (8, 0)), (79.1, (9, 0))])
def test_the_7b_keeps_its_profile_and_the_small_model_is_16_bit_everywhere(monkeypatch, tmp_path, memory, capability):
    monkeypatch.setattr(settings, "gpu", lambda: ("GPU", memory, capability))
    resolved = settings.resolve(None, tmp_path, tmp_path)
    seven = resolved.for_model(DEFAULT_PARAMETERS)
    assert (seven.load_in_4bit, seven.inference_4bit) == (resolved.load_in_4bit, resolved.inference_4bit)
    small = resolved.for_model(SMALL)
    assert not small.load_in_4bit and not small.inference_4bit and small.precision == resolved.precision
    # a 13B: 4-bit training on an A100-40GB, 16-bit from 80 GB
    assert resolved.for_model(13_350_000_000).load_in_4bit == (memory < 79)
    demo = settings.resolve("demo")
    assert demo.for_model(10**11) == demo  # no GPU: nothing to size against


def test_the_batch_that_fits_keeps_the_effective_batch():
    assert settings.batch_that_fits(8, lambda batch: 3.0 * batch, T4, 0.8) == (2, 4)  # 6 <= 11.76 < 12
    assert settings.batch_that_fits(8, lambda batch: 0.1, T4, 0.8) == (8, 1)
    assert settings.batch_that_fits(6, lambda batch: 2.0 * batch, T4, 0.8) == (3, 2)  # divisors only
    assert settings.batch_that_fits(8, lambda batch: 99.0, T4, 0.8) == (1, 8)  # the memory check then refuses


def test_a_run_records_its_family_and_size_and_is_sized_by_them(checkpoints):
    """On a T4 (emulated): the 0.5B trains 16-bit LoRA in fp16 at the largest batch whose computed peak fits; the 7B
    keeps the t4 profile's QLoRA at batch 1 x 8."""
    from transformers import AutoConfig

    t4 = replace(settings.resolve("t4"), gpu_memory_gb=T4, precision="fp16")
    small = training.make_config(t4, model_id=str(checkpoints / "0.5B"), max_length=2 * 729 + 160)
    assert (small["family"], small["parameters"], small["load_in_4bit"], small["precision"]) == (
        "llava", SMALL, False, "fp16")
    assert small["batch_size"] * small["grad_accum"] == t4.batch_size * t4.grad_accum == 8
    model_config = AutoConfig.from_pretrained(checkpoints / "0.5B")
    peak = lambda batch: sum(recipe.memory_estimate_gib({**small, "batch_size": batch}, model_config).values())
    assert peak(small["batch_size"]) <= recipe.WARN_ABOVE * T4 < peak(2 * small["batch_size"])
    assert small["batch_size"] == 4  # computed: 10.1 GiB at 4, 18.3 at 8
    seven = training.make_config(t4, model_id=str(checkpoints / "7B"), max_length=2 * 576 + 160)
    assert (seven["family"], seven["parameters"], seven["load_in_4bit"]) == ("llava_next", DEFAULT_PARAMETERS, True)
    assert (seven["batch_size"], seven["grad_accum"]) == (t4.batch_size, t4.grad_accum) == (1, 8)
    # a checkpoint sized for inference from its folder, as notebooks 03 and 04 do
    assert not t4.for_model_id(checkpoints / "0.5B").inference_4bit
    assert t4.for_model_id(checkpoints / "7B").inference_4bit


def test_the_free_t4_plan_takes_at_most_four_computed_hours():
    plan = cost.free_t4_plan()
    assert plan["fits"] and plan["total hours"] <= cost.FREE_T4_HOURS == 4
    assert plan["model_id"] == "llava-hf/llava-interleave-qwen-0.5b-hf" and plan["training"].startswith("LoRA, 16-bit")
    assert not plan["inference 4-bit"] and plan["baselines"] == ["template"]
    counts = cost.quiz_counts()
    assert plan["generated studies"] == 296 + 590
    assert plan["judged pairs"] == 886 * 5 + counts["template_pairs"]
    assert plan["total hours"] == pytest.approx(sum(plan["hours"].values()), abs=0.01)
    # the 7B does not fit the same bound: its QLoRA training alone is over 5 hours
    assert cost.plan_hours("7B")["hours"]["training"] > 5


def test_the_quiz_counts_are_what_the_annotation_holds():
    """Recounted from IU X-Ray's annotation.json where it is (../shared); the bundled sample's otherwise."""
    if cost.SHARED_ANNOTATION.is_file():
        assert {k: v for k, v in cost.data_counts(cost.SHARED_ANNOTATION).items() if k != "annotation"} == {
            k: v for k, v in cost.IU_XRAY.items() if k != "annotation"}
    sample = cost.data_counts(REPO_ROOT / "data" / "sample" / "annotation.json")
    assert sample["studies"] == {"train": 16, "val": 4, "test": 4}
    assert 30 < sample["text_tokens"] < 300 and 0 < sample["template_pairs"] <= 8 * 5


def test_the_readme_cost_table_is_the_computed_one():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    details = (REPO_ROOT / "docs" / "02_sft_lora_qlora.md").read_text(encoding="utf-8")
    assert cost.readme_table() in readme
    assert f"computed at {cost.free_t4_plan()['total hours']:.2f} h, with no margin" in readme
    with_retrieval = cost.plan_hours("0.5B", baselines=("template", "retrieval"))["total hours"]
    assert f"Computed at {cost.free_t4_plan()['total hours']:.2f} h of the 4-hour bound" in details
    assert f"computes at {with_retrieval:.2f} h" in details


def test_retrieval_embeds_with_a_siglip_tower_without_its_head(sample_studies):
    """LLaVA-interleave's and OneVision's SigLIP towers have no pooling head: the mean of the patches stands in."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers.models.siglip import SiglipImageProcessorPil
    from types import SimpleNamespace

    from helpers.core.data import open_image
    from helpers.evaluate import baselines

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      num_key_value_heads=1),
        vision_feature_layer=-1, vision_feature_select_strategy="full")).eval()
    processor = SimpleNamespace(image_processor=SiglipImageProcessorPil(size={"height": 28, "width": 28}))
    studies = sample_studies[:2]
    embeddings = baselines.image_embeddings(model, processor, studies, max_views=1)
    pixels = processor.image_processor(images=[open_image(s.image_paths[0], s.id) for s in studies],
                                       return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = model.model.vision_tower(pixel_values=pixels).last_hidden_state.mean(dim=1)
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    assert embeddings.shape == (2, 32) and embeddings == pytest.approx(expected, abs=1e-5)


def test_free_t4_is_the_plan_one_switch_runs(tmp_path, monkeypatch, sample_studies):
    """FREE_T4 = True: notebook 02's model is the plan's 0.5B (the demo keeps its tiny one, a given MODEL_ID wins),
    and notebook 04 judges the template baseline alone, loading no model for retrieval."""
    from helpers import commands
    from helpers.core import data, runs
    from helpers.evaluate import evaluation

    t4 = replace(settings.resolve("t4"), gpu_memory_gb=T4)
    assert cost.free_t4_model(None, True, t4) == cost.free_t4_plan()["model_id"] == cost.SIZES["0.5B"]["model_id"]
    assert cost.free_t4_model("mine", True, t4) == "mine" and cost.free_t4_model(None, False, t4) is None
    assert cost.free_t4_model(None, True, settings.resolve("demo")) is None
    for step in ("train", "generate", "evaluate"):  # the switch is a parameter of notebooks 02 to 04
        assert commands.build_parser().parse_args([step, "--free-t4"]).FREE_T4 is True

    def no_model(*args, **kwargs):
        raise AssertionError("the retrieval baseline loaded a model")

    monkeypatch.setattr(evaluation, "load_model_and_processor", no_model)
    refs = {split: data.by_split(sample_studies, split) for split in ("val", "test")}
    plan = evaluation.Plan(runs=["run"], reference_run="run", judge_model_id="judge", judge_precision="fp16",
                           judge_4bit=True, judge_batch_size=8, judge_max_new_tokens=2048, judge_engine="continuous",
                           judge_url=None, base_model_id="base", retrieval_4bit=False, retrieval=False, max_views=2)
    systems = evaluation.with_baselines({"run": {}}, data.by_split(sample_studies, "train"), refs,
                                        runs.Artifacts(tmp_path), plan)
    assert list(systems) == ["run", "template"] == ["run", *cost.free_t4_plan()["baselines"]]
    assert set(systems["template"]["test"]) == {s.id for s in refs["test"]}


def test_a_run_begun_before_family_and_size_were_recorded_still_resumes(tmp_path, checkpoints):
    from helpers.core import runs
    from helpers.core.storage import atomic_write_json

    config = training.make_config(settings.resolve("demo"), model_id=str(checkpoints / "0.5B"), max_length=None)
    run = runs.Artifacts(tmp_path).run("older")
    atomic_write_json(run.config_path, {k: v for k, v in config.items() if k not in ("family", "parameters")})
    training._check_config(run, config)  # resumes
    with pytest.raises(ValueError, match=r"other settings \['lora'\]"):  # what it did record still holds
        training._check_config(run, {**config, "lora": {**config["lora"], "r": 4}})
    atomic_write_json(run.config_path, config)  # once recorded, they hold too
    with pytest.raises(ValueError, match=r"other settings \['family', 'parameters'\]"):
        training._check_config(run, {**config, "family": "gemma3", "parameters": 1})
