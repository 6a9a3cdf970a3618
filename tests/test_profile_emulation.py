"""Each GPU profile's numerics on the CPU, through the chain: two_stage_dpo training (a couple of optimizer steps per
SFT stage, then the preference stage: candidates, the GREEN judge's rewards, DPO) with each stage's held-out check,
generation, attention on one study, the GREEN judge on a few pairs.

Every other family's replica (tests/test_families.py's) runs each profile's numerics on a shorter path, one optimizer
step with its held-out check, then notebook 03's load and one generation (`test_profile_numerics_on_each_family`): the
chain's judge and preference stage are the family-free parts, run once above on LLaVA-NeXT's replica.

`pytest -k profile_emulation` selects these. The GPU is emulated by its settings (`settings.gpu` reports the
profile's GPU), so every choice the code makes from it is the one it makes on that GPU: 4-bit or 16-bit, the
precision, batch sizes, the judge's precision. What the CPU cannot do as CUDA does is said per profile.
"""
import json

import pytest
import torch

from transformers import TrainerCallback

from helpers.core import data, runs, settings
from helpers.model import attention, generation, modeling
from helpers.judge import judge
from helpers.train import examples, preference, preference_stage, training
from helpers.core.settings import torch_dtype
from helpers.demo import tiny_models

from test_families import REPLICAS

# The replica stands in for llava-v1.6-mistral-7b (parameters counted from its config, helpers/preflight/cost.py), so
# the settings are sized for it: make_config would otherwise size them for the replica's few parameters
DEFAULT_PARAMETERS = 7_566_747_648
# (name, GiB as torch reports it, compute capability) of a GPU each profile is picked for
PROFILE_GPUS = {"t4": ("Tesla T4", 14.7, (7, 5)), "l4": ("NVIDIA L4", 22.2, (8, 9)),
                "a100": ("NVIDIA A100-SXM4-40GB", 39.4, (8, 0))}
# What each profile runs, as the settings must give it (the test checks them before running)
EXPECTED = {"t4": dict(precision="fp16", load_in_4bit=True, judge_4bit=True, judge_precision="fp16"),
            "l4": dict(precision="bf16", load_in_4bit=True, judge_4bit=False, judge_precision="fp16"),
            "a100": dict(precision="bf16", load_in_4bit=False, judge_4bit=False, judge_precision="fp16")}
CPU_STANDS_IN = {
    "t4": "4-bit nf4 with fp16 compute as on the T4; the Trainer's fp16 mixed precision has no CPU autocast and no "
          "GradScaler (accelerate turns both off on the CPU), so the training steps run fp32 around the fp16 4-bit "
          "matmuls; the held-out check and everything after run under fp16 autocast or in fp16 as on the T4",
    "l4": "4-bit nf4 with bf16 compute under bf16 autocast, as on the L4",
    "a100": "16-bit bf16 LoRA under bf16 autocast, as on the A100",
}


@pytest.fixture(params=sorted(PROFILE_GPUS))
def emulated(request, monkeypatch, tmp_path, sample_dir):
    """The settings on the profile's GPU, with every other module seeing that GPU too."""
    monkeypatch.setattr(settings, "gpu", lambda: PROFILE_GPUS[request.param])
    resolved = settings.resolve(None, sample_dir, tmp_path)
    assert resolved.profile == request.param
    return resolved


def spy(monkeypatch, module, name, calls):
    """Wrap module.name so that each call's batch size, autocast state and dtype are recorded."""
    real = getattr(module, name)

    def recorded(model, processor, views, *args, **kwargs):
        calls.append({"batch": len(views), "autocast": torch.is_autocast_enabled("cpu"),
                      "autocast_dtype": torch.get_autocast_dtype("cpu")})
        return real(model, processor, views, *args, **kwargs)

    monkeypatch.setattr(module, name, recorded)


class StageArguments(TrainerCallback):
    """Per stage: the batch per device and the dtypes of the trainable parameters as training starts."""

    def __init__(self):
        self.stages = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.stages[args.output_dir.rsplit("/", 1)[-1]] = {
            "batch": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
            "trainable": {p.dtype for p in model.parameters() if p.requires_grad}}


def emulated_judge(emulated, judge_dir, cache, max_new_tokens):
    """The demo's judge in the settings' precision and 4-bit choice, at the profile's batch size."""
    return judge.Judge(str(judge_dir), cache, load_in_4bit=emulated.judge_4bit,
                       dtype=torch_dtype(emulated.judge_precision), batch_size=emulated.judge_batch_size,
                       max_new_tokens=max_new_tokens)


def generated_as_notebook_03(emulated, run, studies):
    """Notebook 03 on `studies`: the run loaded as the settings load it (4-bit or not, the training precision's
    weights), reports through the batch runner. Returns (model, processor, the records by study id)."""
    config = run.config
    model, processor, _ = modeling.load_for_inference(run, small_gpu=emulated.inference_4bit)
    four_bit = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert four_bit == EXPECTED[emulated.profile]["load_in_4bit"]
    assert model.get_input_embeddings().weight.dtype == torch_dtype(config["precision"])
    out = run.predictions("test")
    speed = generation.generate_split(model, processor, studies, out, max_views=config["max_views"],
                                      batch_size=emulated.generate_batch_size, max_new_tokens=8)
    assert speed["generated_now"] == len(studies) and speed["batch_size"] == emulated.generate_batch_size
    records = generation.load_predictions(out, studies)
    assert set(records) == {s.id for s in studies}
    # a token probability that overflowed to NaN (fp16's risk) fails this too
    assert all(c is None or 0 <= c <= 1 for r in records.values() for c in r["confidence"].values())
    return model, processor, records


def test_profile_emulation_chain(emulated, tiny_model_dir, green_judge_dir, sample_studies, tmp_path, monkeypatch):
    profile = emulated.profile
    print(f"{profile}: {CPU_STANDS_IN[profile]}")
    assert {k: getattr(emulated, k) for k in EXPECTED[profile]} == EXPECTED[profile]
    assert emulated.judge_max_new_tokens == judge.GREEN_MAX_LENGTH

    # three stages of one epoch, 2 optimizer steps per SFT stage at the profile's batch size; no accumulation, for
    # time (the effective batch of the profiles: test_training.py)
    fit, held = examples.holdout_split(data.by_split(sample_studies, "train"))
    fit = fit[:2 * emulated.batch_size]
    stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage_dpo"]]
    demo_answer = settings.PROFILES["demo"]["judge_max_new_tokens"]  # the tiny judge's answers end within it
    green = emulated_judge(emulated, green_judge_dir, tmp_path / "rewards_cache.jsonl", demo_answer)
    # target_tokens_max: generation runs up to 1.5x this many tokens (the random model never stops); min_gap 0: any
    # two distinct candidates of the barely trained model pair
    config = training.make_config(emulated, model_id=str(tiny_model_dir), max_length=1024, stages=stages,
                                  save_steps=2, target_tokens_max=6, grad_accum=1, parameters=DEFAULT_PARAMETERS,
                                  preference={**preference.preference_settings(judge=green.label), "min_gap": 0.0})
    assert config["batch_size"] == emulated.batch_size and config["precision"] == EXPECTED[profile]["precision"]
    generate_calls, sample_calls, arguments = [], [], StageArguments()
    spy(monkeypatch, training, "generate_batch", generate_calls)  # the held-out checks
    spy(monkeypatch, preference_stage, "generate_batch", generate_calls)  # the greedy candidates
    spy(monkeypatch, preference_stage, "sample_batch", sample_calls)
    run = runs.Artifacts(tmp_path).run(profile)
    metrics = training.train(run, config, fit, held, callbacks=[arguments], judge=green)
    for stage in metrics["stages"][:2]:
        assert stage["global_step"] == 2, stage
    for stage in metrics["stages"]:
        assert "error" not in stage["holdout_nlg"], stage["holdout_nlg"]
        assert stage["holdout_nlg"]["pairs"] == len(held)
    # every stage trains fp32 parameters; the preference stage at half the batch (a pair is two sequences)
    assert all(a["trainable"] == {torch.float32} for a in arguments.stages.values()), arguments.stages
    assert arguments.stages["3_preference"]["batch"] == max(1, emulated.batch_size // 2)
    record = metrics["stages"][2]
    assert record["global_step"] >= 1 and record["preference"]["pairs"] >= 1
    # the checks and the candidates ran under the training precision's autocast, within the generation batch
    autocast = config["precision"] != "fp32"
    studies_per_batch = max(1, emulated.generate_batch_size // (1 + preference.CANDIDATES))  # 1 + 4 rows each
    assert sample_calls and all(c["batch"] <= studies_per_batch for c in sample_calls)
    assert generate_calls and all(c["batch"] <= emulated.generate_batch_size for c in generate_calls)
    assert all(c["autocast"] == autocast and c["autocast_dtype"] == torch_dtype(config["precision"])
               for c in generate_calls + sample_calls)

    test = data.by_split(sample_studies, "test")
    model, processor, records = generated_as_notebook_03(emulated, run, test)
    analysis = attention.analyze_study(model, processor, test[0], max_views=config["max_views"], max_new_tokens=6)
    assert analysis["attention"].shape[0] == len(analysis["ids"]) > 0
    del model

    # notebook 04: the GREEN judge in the settings' precision (4-bit on the T4), at the profile's batch size, within
    # the demo's answer budget (the tiny judge's answers end there)
    green = emulated_judge(emulated, green_judge_dir, tmp_path / "green_cache.jsonl", demo_answer)
    pairs = [(s.regions["lung"], records[s.id]["regions"]["lung"] or "No finding.") for s in test[:2]]
    judged = green.judge(pairs)
    assert len(judged) == 2 and all(r["judge"] == green.label for r in judged)
    assert green.label.endswith("(4-bit nf4, fp16 compute)" if emulated.judge_4bit else "(fp16)")
    assert green.model.get_input_embeddings().weight.dtype == torch.float16
    assert any(type(m).__name__ == "Linear4bit" for m in green.model.modules()) == emulated.judge_4bit
    assert json.loads((tmp_path / "green_cache.jsonl").read_text().splitlines()[0])["judge"] == green.label


@pytest.fixture(scope="module", params=sorted(REPLICAS))
def replica(request, tmp_path_factory, sample_studies):
    """(family, folder): a family's tiny replica (tests/test_families.py's), built once for every profile."""
    return request.param, REPLICAS[request.param].build(tmp_path_factory.mktemp("replica") / request.param,
                                                         tiny_models.tokenizer_corpus(sample_studies))


def test_profile_numerics_on_each_family(emulated, replica, sample_studies, tmp_path):
    """Each profile's 4-bit choice and precision (sized for a 7B, as the chain, so that every family meets nf4 with
    fp16 and with bf16 compute, and bf16 16-bit) on the family's replica: one optimizer step of the qlora preset,
    its held-out check (generation under the training autocast), then notebook 03's load and one study generated.
    Losses and token probabilities finite."""
    name, folder = replica
    fit, held = examples.holdout_split(data.by_split(sample_studies, "train"))
    config = training.make_config(emulated, model_id=str(folder), max_length=1024, preset="qlora", epochs=1,
                                  grad_accum=1, logging_steps=1, target_tokens_max=6,
                                  parameters=DEFAULT_PARAMETERS)
    assert (config["precision"], config["load_in_4bit"]) == (EXPECTED[emulated.profile]["precision"],
                                                             EXPECTED[emulated.profile]["load_in_4bit"])
    run = runs.Artifacts(tmp_path).run(f"{name}-{emulated.profile}")
    metrics = training.train(run, config, fit[:config["batch_size"]], held[:1])
    stage = metrics["stages"][0]
    assert stage["global_step"] == 1 and "error" not in stage["holdout_nlg"], stage
    assert stage["loss"] and all(torch.isfinite(torch.tensor(loss)) for _, loss in stage["loss"]), stage["loss"]
    generated_as_notebook_03(emulated, run, data.by_split(sample_studies, "test")[:1])
