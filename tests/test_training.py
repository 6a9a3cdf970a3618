"""Notebook 02 on the tiny model: label masking, token budget, stages, resume, 4-bit on CPU, overfit (the notebook
itself: test_demo.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from helpers.core import data, report_format, runs
from helpers.model import families, modeling
from helpers.train import examples, recipe, training
from helpers.model.modeling import generation_inputs, image_tokens_per_view, load_for_inference
from helpers.core.settings import resolve

DEMO = resolve("demo")


@pytest.fixture(scope="module")
def train_studies(sample_studies):
    return data.by_split(sample_studies, "train")


@pytest.fixture(scope="module")
def by_views(train_studies):
    """One training study with 1, 2 and 3 views."""
    return {n: next(s for s in train_studies if len(s.image_paths) == n) for n in (1, 2, 3)}


def config_for(tiny_model_dir, settings=DEMO, **overrides):
    return training.make_config(settings, **{"model_id": tiny_model_dir, "max_length": None, **overrides})


@pytest.fixture(scope="module", params=modeling.VISUAL_TOKENS)
def two_stage(tiny_model_dir, request):
    """A two_stage PEFT model (vision LoRA, projector, LLM LoRA) and its processor, in each visual-token mode."""
    config = config_for(tiny_model_dir, visual_tokens=request.param)
    model, processor = training.load_training_model(config)
    return config, model, processor


def collate(trainer, studies, max_views=3):
    dataset = examples.build_dataset(studies, max_views, trainer.processing_class)
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def test_training_rows_decode_views_with_open_image(tmp_path, model_and_processor):
    """A 16-bit PNG is scaled by its bit depth in training as in generation (PIL's convert would clip it)."""
    path = tmp_path / "images" / "a" / "0.png"
    path.parent.mkdir(parents=True)
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(path)
    study = data.Study(id="a", split="train", regions=dict.fromkeys(data.ALL_REGIONS, ""), original_report=None,
                       image_paths=[path])
    views = examples.build_dataset([study], 3, model_and_processor[1])[0]["images"]
    assert len(views) == 1 and np.array_equal(np.asarray(views[0]), np.asarray(data.open_image(path, "a")))
    assert np.array_equal(np.asarray(views[0])[..., 0], np.round(ramp / 257))  # value * 255 / 65535


def test_labels_cover_exactly_the_target_and_eos_with_one_bos(two_stage, by_views, tmp_path):
    config, model, processor = two_stage
    stage = config["stages"][0]
    studies = [by_views[1], by_views[2], by_views[3]]
    dataset = examples.build_dataset(studies, 3, processor)
    trainer = training.make_trainer(model, processor, config, stage, tmp_path, dataset, dataset)
    batch = collate(trainer, studies)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    assert batch["pixel_values"].shape[0] == 1 + 2 + 3  # one entry per view
    assert batch.get("image_sizes", batch["pixel_values"]).shape[0] == 1 + 2 + 3  # LLaVA-NeXT: its size too
    for row, study in enumerate(studies):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        trained = (labels != -100).nonzero().flatten()
        # the target and </s>, nothing else: prompt, images and padding are all -100
        assert tokenizer.decode(ids[trained]) == report_format.format_report(study.regions) + "</s>"
        assert trained.tolist() == list(range(trained[0], trained[-1] + 1))
        assert (labels[ids == image_id] == -100).all()
        assert (labels[mask == 0] == -100).all()
        views = data.study_images(study, 3)
        assert (ids == image_id).sum() == sum(image_tokens_per_view(processor, *v.size) for v in views)
        # one BOS, and the prompt is token for token what generation feeds the model
        assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
        prompt = generation_inputs(processor, [views])["input_ids"][0]
        assert ids[:trained[0]].tolist() == prompt.tolist()
    # the multi-view batch goes through the model: image features and image tokens match
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_token_budget_is_exact_and_never_truncates(two_stage, train_studies, tmp_path):
    config, model, processor = two_stage
    counts = examples.token_counts(train_studies, processor, 3)
    assert [c["id"] for c in counts] == [s.id for s in train_studies]
    max_length = max(c["total"] for c in counts)
    dataset = examples.build_dataset(train_studies, 3, processor)
    exact = training.make_trainer(model, processor, {**config, "max_length": max_length}, config["stages"][0],
                                  tmp_path, dataset, dataset)
    batch = collate(exact, train_studies)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert batch["input_ids"].shape[1] == max_length
    for row, count in enumerate(counts):
        assert batch["attention_mask"][row].sum() == count["total"]
        assert (batch["input_ids"][row] == image_id).sum() == count["image_tokens"]
        assert (batch["labels"][row] != -100).sum() == count["target_tokens"]
    # the budget is tight: two tokens less (the template's trailing space after </s>, then </s>) cuts the target
    short = training.make_trainer(model, processor, {**config, "max_length": max_length - 2}, config["stages"][0],
                                  tmp_path, dataset, dataset)
    longest = max(range(len(counts)), key=lambda i: counts[i]["total"])
    assert (collate(short, train_studies)["labels"][longest] != -100).sum() == counts[longest]["target_tokens"] - 1


def expected_lora(model, pattern, r):
    import re

    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, name))


def test_stage_toggling_counts(two_stage, tiny_model_dir):
    config, model, processor = two_stage
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    r = config["lora"]["r"]
    assert config["vision_lora_layers"] == base.config.vision_config.num_hidden_layers - 1  # feature layer -2
    llm = expected_lora(base, families.LLM_TARGETS, r)
    family = modeling.checkpoint_family(tiny_model_dir)
    vision = expected_lora(base, family.vision_targets(config["vision_lora_layers"]), r)
    projector = sum(p.numel() for p in base.model.multi_modal_projector.parameters())
    assert llm > 0 and vision > 0 and projector > 0
    stage1, stage2 = config["stages"]
    assert training.set_trainable(model, stage1) == {"vision_tower": 0, "projector": projector,
                                                     "language_model": llm, "other": 0}
    assert training.set_trainable(model, stage2) == {"vision_tower": vision, "projector": projector,
                                                     "language_model": llm, "other": 0}
    shallow, delta = training.PRESETS["r2gengpt_shallow"][0], training.PRESETS["r2gengpt_delta"][0]
    assert training.set_trainable(model, shallow) == {"vision_tower": 0, "projector": projector,
                                                      "language_model": 0, "other": 0}
    assert training.set_trainable(model, delta) == {"vision_tower": vision, "projector": projector,
                                                    "language_model": 0, "other": 0}
    # the qlora preset puts no LoRA on the vision tower at all
    qlora = training.lora_config(config_for(tiny_model_dir, preset="qlora"))
    assert expected_lora(base, qlora.target_modules, r) == llm


def test_vision_lora_stops_at_the_feature_layer():
    """llava-v1.6-mistral-7b: CLIP ViT-L/14 has 24 layers and the features are hidden state -2, the output of layer
    index 22, so LoRA goes on layers 0-22 and never on layer 23."""
    import re

    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    real = LlavaNextConfig(vision_config=CLIPVisionConfig(num_hidden_layers=24), text_config=MistralConfig(),
                           vision_feature_layer=-2)
    assert modeling.vision_layers_used(real) == 23
    assert modeling.vision_layers_used(LlavaNextConfig(vision_config=CLIPVisionConfig(num_hidden_layers=24),
                                                       text_config=MistralConfig(), vision_feature_layer=[-2, 5])) == 23
    pattern = families.family_of(real).vision_targets(23)
    layer = "model.vision_tower.encoder.layers.{}.self_attn.q_proj"  # transformers 5 module paths
    assert re.fullmatch(pattern, layer.format(22)) and re.fullmatch(pattern, layer.format(0))
    assert not re.fullmatch(pattern, layer.format(23)) and not re.fullmatch(pattern, layer.format(2) + "x")


def test_processes_share_the_gradient_accumulation(tiny_model_dir, monkeypatch):
    """N processes keep the profile's effective batch: each accumulates 1/N of its steps (t4: 1 x 8)."""
    from types import SimpleNamespace

    t4 = resolve("t4")
    assert config_for(tiny_model_dir, t4)["grad_accum"] == t4.grad_accum == 8
    for n, accumulation in ((2, 4), (4, 2), (8, 1), (16, 1)):
        monkeypatch.setattr(training, "processes", lambda: SimpleNamespace(num_processes=n))
        config = config_for(tiny_model_dir, t4)
        assert (config["grad_accum"], config["processes"]) == (accumulation, n)


def test_presets():
    assert [s["epochs"] for s in training.resolve_stages("two_stage", 3)] == [1, 2]
    assert [s["epochs"] for s in training.resolve_stages("qlora", 3)] == [3]
    # the preference stage's epoch is its own: the SFT stages are two_stage's
    dpo = training.resolve_stages("two_stage_dpo", 3)
    assert dpo[:2] == training.resolve_stages("two_stage", 3) and [s["epochs"] for s in dpo] == [1, 2, 1]
    assert dpo[2]["dpo"] and all(dpo[2][part] for part in ("llm_lora", "vision_lora", "projector"))
    with pytest.raises(ValueError, match="needs more than 1 epoch"):
        training.resolve_stages("two_stage", 1)
    with pytest.raises(ValueError, match="unknown PRESET"):
        training.resolve_stages("nope", 3)


@pytest.mark.parametrize("mode", modeling.VISUAL_TOKENS)
def test_fp32_adapters_on_t4_settings(tiny_model_dir, train_studies, tmp_path, mode):
    """The T4 path (4-bit, fp16): after each two_stage trainer is built every trainable parameter is fp32, and so is
    every gradient, because the CUDA GradScaler that fp16 training uses cannot unscale bf16 gradients."""
    from dataclasses import replace

    t4 = replace(resolve("t4"), precision="fp16")  # what pick_profile gives a T4; fp16 is what its capability gives
    config = config_for(tiny_model_dir, t4, max_length=512, visual_tokens=mode)
    assert config["load_in_4bit"] and config["precision"] == "fp16"
    model, processor = training.load_training_model(config)
    dataset = examples.build_dataset(train_studies[:2], 3, processor)
    previous = None
    for stage in config["stages"]:
        training.set_trainable(model, stage)
        if previous:  # what stage 1 trained must reach stage 2 unrounded (TRL's bf16 cast is undone exactly)
            for name, value in previous.items():
                assert torch.equal(dict(model.named_parameters())[name].data, value), name
        trainer = training.make_trainer(model, processor, config, stage, tmp_path / stage["name"], dataset, dataset)
        assert trainer.args.fp16 and not trainer.args.bf16
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
        model(**trainer.data_collator([dataset[i] for i in range(2)])).loss.backward()
        with_grad = {n for n, p in trainable.items() if p.grad is not None}
        assert {trainable[n].grad.dtype for n in with_grad} == {torch.float32}
        # every trainable parameter gets a gradient (DDP requires it): no LoRA after the layer the features read
        assert with_grad == set(trainable)
        model.zero_grad()
        previous = {n: p.data.clone().add_(0.01) for n, p in trainable.items()}  # as if trained
        for name, value in previous.items():
            dict(model.named_parameters())[name].data.copy_(value)


def test_holdout_is_a_stable_slice_of_train(train_studies, sample_studies):
    fit, held = examples.holdout_split(train_studies)
    assert len(held) == 2 and len(fit) == len(train_studies) - 2
    assert not {s.id for s in fit} & {s.id for s in held}
    assert {s.id for s in examples.holdout_split(list(reversed(train_studies)))[1]} == {s.id for s in held}
    with pytest.raises(ValueError, match="train split only"):
        examples.holdout_split(sample_studies)


class Interrupt(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    """Raise right after the checkpoint of `step` in stage `stage_dir` is on disk, like a Colab disconnect."""

    def __init__(self, stage_dir_name, step):
        self.stage_dir_name, self.step = stage_dir_name, step

    def on_save(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.stage_dir_name) and state.global_step == self.step:
            raise Interrupt


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((args.output_dir.rsplit("/", 1)[-1], state.global_step))


def test_interrupted_run_resumes_without_redoing_anything(tiny_model_dir, train_studies, tmp_path):
    stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage"]]
    config = config_for(tiny_model_dir, stages=stages, max_length=256, save_steps=1)
    fit, held = train_studies[:6], train_studies[6:7]  # 3 steps per stage
    run = runs.Artifacts(tmp_path).run("run")
    with pytest.raises(Interrupt):
        training.train(run, config, fit, held, callbacks=[InterruptAfterSave("2_vision_lora", 2)])
    assert (run.checkpoints_dir / "1_frozen_vision" / "stage_done.json").is_file()
    assert not run.trained
    counter = CountSteps()
    metrics = training.train(run, config, fit, held, callbacks=[counter])
    assert counter.steps == [("2_vision_lora", 3)]  # stage 1 skipped, stage 2 continues at step 3
    stage1, stage2 = metrics["stages"]
    assert (stage1["global_step"], stage1["resumed_from_step"]) == (3, 0)
    assert (stage2["global_step"], stage2["resumed_from_step"]) == (3, 2)
    assert [step for step, _ in stage2["loss"]] == [1, 2, 3]
    assert json.loads(run.metrics_path.read_text()) == metrics
    # killed after the last stage but before the adapter was written: the rerun writes the last stage's weights
    from peft.utils import load_peft_weights

    run.metrics_path.unlink()
    (run.adapter_dir / "adapter_config.json").unlink()
    assert training.train(run, config, fit, held, callbacks=[counter]) == metrics and len(counter.steps) == 1
    final, adapter = (load_peft_weights(str(d)) for d in (run.checkpoints_dir / "2_vision_lora" / "final",
                                                            run.adapter_dir))
    assert final.keys() == adapter.keys() and all(torch.equal(final[k], adapter[k]) for k in final)
    # a finished run is not trained again; other settings under the same run are refused
    assert training.train(run, config, fit, held, callbacks=[counter]) == metrics and len(counter.steps) == 1
    with pytest.raises(ValueError, match="other settings"):
        training.train(run, {**config, "max_length": 300}, fit, held)


class KeepOptimizer(TrainerCallback):
    """A weak reference to each stage's optimizer, to see whether anything still holds it."""

    def __init__(self):
        self.optimizers = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        import weakref

        self.optimizers.append(weakref.ref(optimizer))


def test_holdout_check_runs_in_batches_after_the_trainer_is_released(tiny_model_dir, train_studies, tmp_path,
                                                                      monkeypatch):
    import gc

    stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage"]]
    config = config_for(tiny_model_dir, stages=stages, max_length=256, save_steps=2, generate_batch_size=2,
                        target_tokens_max=4)
    optimizers, calls, real = KeepOptimizer(), [], training.generate_batch

    def generate_batch(model, processor, views, ids, **kwargs):
        gc.collect()
        calls.append((len(views), [ref() is None for ref in optimizers.optimizers]))
        return real(model, processor, views, ids, **kwargs)

    monkeypatch.setattr(training, "generate_batch", generate_batch)
    metrics = training.train(runs.Artifacts(tmp_path).run("run"), config, train_studies[:2], train_studies[2:7],
                             callbacks=[optimizers])
    assert [batch for batch, _ in calls] == [2, 2, 1, 2, 2, 1]  # 5 held-out studies, twice, 2 at a time
    assert all(all(released) for _, released in calls)  # no optimizer state left while the check generates
    assert all(s["holdout_nlg"]["pairs"] == 5 for s in metrics["stages"])


def test_a_failed_holdout_check_never_blocks_the_stage(tiny_model_dir, train_studies, tmp_path, monkeypatch):
    stages = [dict(s, epochs=1) for s in training.PRESETS["two_stage"]]
    config = config_for(tiny_model_dir, stages=stages, max_length=256, save_steps=2, target_tokens_max=4)
    run, fit, held = runs.Artifacts(tmp_path).run("run"), train_studies[:2], train_studies[2:4]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED")  # not an allocation failure: no retry

    monkeypatch.setattr(training, "generate_batch", out_of_memory)
    metrics = training.train(run, config, fit, held)
    assert run.trained and json.loads(run.metrics_path.read_text()) == metrics
    for stage, record in zip(("1_frozen_vision", "2_vision_lora"), metrics["stages"]):
        assert record["holdout_nlg"] == {"error": "RuntimeError: CUDA error: CUBLAS_STATUS_EXECUTION_FAILED"}
        assert json.loads((run.checkpoints_dir / stage / "stage_done.json").read_text()) == record
        assert (run.checkpoints_dir / stage / "final" / "adapter_model.safetensors").is_file()
    # a check killed midway (its record has no result yet) runs again on rerun, without training anything
    monkeypatch.undo()
    done = run.checkpoints_dir / "2_vision_lora" / "stage_done.json"
    record = json.loads(done.read_text())
    del record["holdout_nlg"]
    done.write_text(json.dumps(record))
    run.metrics_path.unlink()
    counter = CountSteps()
    again = training.train(run, config, fit, held, callbacks=[counter])
    assert counter.steps == [] and again["stages"][0] == metrics["stages"][0]
    assert again["stages"][1]["holdout_nlg"]["pairs"] == len(held)
    assert training.train(run, config, fit, held, callbacks=[counter]) == again and counter.steps == []


def test_overfits_a_fixed_small_batch(tiny_model_dir, train_studies, tmp_path):
    stages = [{"name": "overfit", "epochs": 20, "lr": 3e-3, "vision_lora": False, "projector": True, "llm_lora": True}]
    config = config_for(tiny_model_dir, stages=stages, max_length=256, save_steps=10)
    metrics = training.train(runs.Artifacts(tmp_path).run("run"), config, train_studies[:2], train_studies[2:3])
    losses = [loss for _, loss in metrics["stages"][0]["loss"]]
    assert len(losses) == 20
    assert losses[-1] < 0.3 * losses[0], losses


def test_qlora_4bit_trains_on_cpu_and_skips_modules_by_full_path(tiny_model_dir, train_studies, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    config = config_for(tiny_model_dir, preset="qlora", epochs=1, load_in_4bit=True, max_length=256, save_steps=2)
    run = runs.Artifacts(tmp_path).run("run")
    metrics = training.train(run, config, train_studies[:4], train_studies[4:5])
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in metrics["stages"][0]["loss"])
    model, processor, loaded = load_for_inference(run)
    assert loaded["load_in_4bit"] and loaded["visual_tokens"] == config["visual_tokens"]
    kinds = {name: type(m) for name, m in model.base_model.model.named_modules() if isinstance(m, torch.nn.Linear)}
    four_bit = {n for n, k in kinds.items() if issubclass(k, bnb.nn.Linear4bit)}
    assert four_bit and all(".language_model." in n for n in four_bit)
    assert any("vision_tower" in n for n in kinds) and any("multi_modal_projector" in n for n in kinds)
    assert "lm_head" in kinds and "lm_head" not in four_bit
    inputs = generation_inputs(processor, [data.study_images(train_studies[0], 3)])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 4
    # bare module names are not matched: the vision tower gets quantized
    bare = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, quantization_config=bare,
                                                        device_map={"": "cpu"})
    assert isinstance(plain.model.vision_tower.encoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def real_shaped_config():
    """llava-v1.6-mistral-7b's config (shapes from its config.json), to count parameters on the meta device."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, projection_dim=768, image_size=336, patch_size=14),
        text_config=MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8),
        image_grid_pinpoints=modeling.HUB_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default")


@pytest.mark.parametrize("profile,gpu_gib,mode,views,outcome", [
    ("t4", 14.7, "anyres", 3, "warned"), ("t4", 14.7, "base", 3, "fits"), ("l4", 22.2, "anyres", 3, "fits"),
    ("a100", 39.4, "anyres", 3, "refused"), ("a100", 39.4, "base", 3, "fits")])
def test_runs_that_cannot_fit_are_warned_about_or_refused_before_loading(tmp_path, recwarn, profile, gpu_gib, mode,
                                                                         views, outcome):
    """Computed, not measured: anyres QLoRA over three 512x512 views on a T4 comes within 80% of its memory; at the
    a100 profile's batch of 4 the same studies need more than an A100-40GB has."""
    real_shaped_config().save_pretrained(tmp_path)  # the config alone: make_config reads nothing else
    max_length = views * modeling.visual_tokens_per_view(512, 512, mode) + 160  # + prompt and report text
    settings = resolve(profile)
    assert settings.gpu_memory_gb is None  # no GPU here: the check runs on the emulated GPU's memory
    from dataclasses import replace

    on_gpu = replace(settings, gpu_memory_gb=gpu_gib)
    make = lambda: training.make_config(on_gpu, model_id=str(tmp_path), max_length=max_length, visual_tokens=mode)
    if outcome == "refused":
        with pytest.raises(ValueError, match=r"computed training peak ~\d+\.\d GiB .* it cannot fit"):
            make()
        return
    config = make()
    messages = [str(w.message) for w in recwarn if "computed training peak" in str(w.message)]
    assert len(messages) == (outcome == "warned"), messages
    total = sum(recipe.memory_estimate_gib(config, real_shaped_config()).values())
    assert (total > recipe.WARN_ABOVE * gpu_gib) == (outcome == "warned") and total < gpu_gib
