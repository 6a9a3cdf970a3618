"""Issue 31: each family beyond LLaVA-NeXT, built outside the project as a tiny random replica in a folder, goes
through the commands LLaVA-NeXT goes through: trained with the qlora and two_stage presets, val and test generated, a
PNG and a DICOM predicted, attention on its grid, labels and prompts exact. Another family is refused by name.
Families: a LLaVA with a Qwen2 LLM inside (llava-hf/llava-interleave-qwen-0.5b-hf's layout), LLaVA-OneVision,
Gemma 3 (google/medgemma-4b-it's layout), Qwen2.5-VL. LLaVA-NeXT's other v1.6 checkpoints (vicuna, llama3, 34b), each
with its own chat template: labels, prompt and one training step only (the LLaVA-NeXT path itself is mistral's, the
tiny LLaVA's, tested throughout the suite)."""
import json
import re
from typing import Callable, NamedTuple

import pytest
import torch
from safetensors import safe_open
from trl.chat_template_utils import llava_next_training_chat_template
from transformers import (AutoConfig, Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor, Gemma3TextConfig,
                          Idefics3Config, LlavaConfig, LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil,
                          LlavaOnevisionProcessor, LlavaProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2Config,
                          Qwen2VLImageProcessorPil, SiglipImageProcessorPil, SiglipVisionConfig)

from helpers import commands
from helpers.core import data, report_format
from helpers.core.errors import OptionError
from helpers.core.runs import SPLIT_NAMES, Artifacts
from helpers.core.settings import resolve
from helpers.demo import tiny_models, tiny_vlms
from helpers.model import attention, families, modeling
from helpers.model.generation import load_predictions
from helpers.train import examples, training

from test_predict import dicom_of

VIEW = "CXR1209_IM-0142/0.png"  # a sample view (test_predict's)
SIDE = tiny_models.TINY_IMAGE_SIZE // 14  # the LLaVA replicas' base grid


class Replica(NamedTuple):
    build: Callable  # the builder: (folder, texts) -> folder
    end: str  # what the chat template writes after an assistant turn's text
    user: str  # how the generation prompt starts (BOS included)
    side: int | None  # a view's grid side (None: the view's resized shape, Qwen2.5-VL's image_grid_thw)
    newlines: int  # newline positions after each of several views
    between: str  # what the prompt has between two views' image tokens


REPLICAS = {
    "llava-qwen": Replica(tiny_models.build_random_llava_qwen, "<|im_end|>\n", "<|im_start|>user\n", SIDE, 0, ""),
    "onevision": Replica(tiny_vlms.build_random_llava_onevision, "<|im_end|>", "<|im_start|>user ", SIDE, 1, ""),
    "gemma3": Replica(tiny_vlms.build_random_gemma3, "<end_of_turn>\n", "<bos><start_of_turn>user\n", 2, 0,
                      "<end_of_image>\n\n\n\n<start_of_image>"),
    "qwen2_5_vl": Replica(tiny_vlms.build_random_qwen2_5_vl, "<|im_end|>\n",
                          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", None, 0,
                          "<|vision_end|><|vision_start|>"),
}


def grids(processor, views, side) -> list[tuple[int, int]]:
    """Each view's grid of image tokens: side x side, or what Qwen2.5-VL's image processor makes of the view (its
    image_grid_thw in 14 px patches, merged 2x2)."""
    if side:
        return [(side, side)] * len(views)
    return [(h // 2, w // 2) for _, h, w in processor.image_processor(images=views)["image_grid_thw"].tolist()]


@pytest.fixture(scope="module")
def split_root(tmp_path_factory):
    """One artifacts folder for every family, the rules split made once."""
    out = tmp_path_factory.mktemp("artifacts")
    assert commands.main(["split", "--profile", "demo", "--artifacts-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=sorted(REPLICAS))
def family(request, tmp_path_factory, sample_studies):
    """(name, replica folder): the replica in a folder of its own, as a user's download would be: the project learns
    it only from there."""
    return request.param, REPLICAS[request.param].build(tmp_path_factory.mktemp("outside") / request.param,
                                                         tiny_models.tokenizer_corpus(sample_studies))


@pytest.fixture(scope="module")
def artifacts(split_root, family):
    """A qlora and a two_stage run of the family's replica (runs "<family>-<preset>"), the qlora run generated."""
    name, folder = family
    common = ["--profile", "demo", "--artifacts-dir", str(split_root)]
    for preset in ("qlora", "two_stage"):
        assert commands.main(["train", *common, "--model-id", str(folder), "--preset", preset,
                              "--run-name", f"{name}-{preset}"]) == 0
    assert commands.main(["generate", *common, "--run-name", f"{name}-qlora", "--grounding-studies", "2"]) == 0
    return Artifacts(split_root)


def test_both_presets_train_and_generate_writes_every_val_and_test_study(artifacts, family, sample_studies):
    name, folder = family
    for preset, stages in (("qlora", 1), ("two_stage", 2)):
        run = artifacts.run(f"{name}-{preset}")
        config = run.config
        assert run.trained and config["model_id"] == str(folder) and config["visual_tokens"] == "base"
        metrics = json.loads(run.metrics_path.read_text())
        assert [s["stage"] for s in metrics["stages"]] == list(range(1, stages + 1))
        assert all(s["global_step"] > 0 for s in metrics["stages"])
    assert (artifacts.run(f"{name}-two_stage").config["stages"][1]["vision_lora"]
            and modeling.vision_layers_used(AutoConfig.from_pretrained(folder)) == 2)  # layer -1: both layers
    family_row = families.family_of(AutoConfig.from_pretrained(folder))
    with safe_open(artifacts.run(f"{name}-two_stage").adapter_dir / "adapter_model.safetensors", "pt") as adapter:
        saved = list(adapter.keys())
    for layer in (0, 1):  # the vision LoRA in both tower layers, found by the family's module names
        assert any(f".{family_row.vision_tower}." in k and f".{layer}." in k and "lora_A" in k for k in saved)
    assert any(f".{family_row.projector}." in k and "lora" not in k for k in saved)  # the projector in full
    run = artifacts.run(f"{name}-qlora")
    # the saved processor names no class of ours (modeling.ImageOnlyVideoProcessor saves as the checkpoint's own)
    assert all("ImageOnlyVideoProcessor" not in f.read_text() for f in run.adapter_dir.glob("*.json"))
    for split in SPLIT_NAMES:
        predictions = load_predictions(run.predictions(split))
        assert sorted(predictions) == sorted(s.id for s in data.by_split(sample_studies, split))
        assert all(set(p["regions"]) >= set(report_format.REGIONS) for p in predictions.values())


def test_predict_reads_a_png_and_a_dicom(artifacts, family, sample_dir, tmp_path, capsys):
    png = sample_dir / "images" / VIEW
    dicom = dicom_of(png, tmp_path / "lateral.dcm")
    out = tmp_path / "out"
    assert commands.main(["predict", "--profile", "demo", "--artifacts-dir", str(artifacts.root), "--run-name",
                          f"{family[0]}-qlora", "--out-dir", str(out), str(png), str(dicom)]) == 0
    assert "Lung:" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 2  # an attention overlay per view


def test_attention_maps_have_the_family_grid(artifacts, family, sample_studies):
    replica = REPLICAS[family[0]]
    side, newlines = replica.side, replica.newlines
    model, processor, config = modeling.load_for_inference(artifacts.run(f"{family[0]}-qlora"))
    study = next(s for s in data.by_split(sample_studies, "val") if len(s.image_paths) >= 2)
    analysis = attention.analyze_study(model, processor, study, max_views=config["max_views"], max_new_tokens=6)
    assert len(analysis["views"]) >= 2
    shapes = grids(processor, analysis["views"], side)
    assert [layout["base"].shape for layout in analysis["layouts"]] == shapes
    assert all(layout["newline"].tolist() == list(range(h * w, h * w + newlines)) and layout["highres"].size == 0
               for layout, (h, w) in zip(analysis["layouts"], shapes))  # no grid beyond the base tile
    blocks = analysis["positions"]
    assert [len(b) for b in blocks] == [h * w + newlines for h, w in shapes]
    prompt = modeling.generation_inputs(processor, [analysis["views"]])["input_ids"][0]
    assert all(processor.tokenizer.decode(prompt[before[-1] + 1:after[0]]) == replica.between
               for before, after in zip(blocks, blocks[1:]))  # what separates the views
    assert all([m.shape for m in maps] == shapes for maps in analysis["heatmaps"].values())


def test_the_real_geometry_counts_each_family_s_tokens(model_and_processor):
    """At the real size, SigLIP 384 px / 14: 27x27 = 729 tokens a view in LLaVA, whatever the view's shape; in
    LLaVA-OneVision 729 + 1 newline a view when a prompt has several, one 512x512 view tiled up to anyres_max_9:
    the base tile, then 54 rows of 54 and a newline (3,699, as the processor's own count gives); in Gemma 3 896 px
    pooled to 16x16 = 256 a view, whatever its shape; in Qwen2.5-VL (its processor's default pixel bounds) a view
    resized to multiples of 28 px, one token per 28 px square: 324 for 512x512."""
    tokenizer = model_and_processor[1].tokenizer  # any tokenizer with an <image> token: only counts are read
    siglip = SiglipVisionConfig(image_size=384, patch_size=14)
    llava = LlavaConfig(vision_config=siglip, text_config=Qwen2Config(), vision_feature_layer=-1,
                        vision_feature_select_strategy="full")
    llava_processor = modeling.fit_processor(
        LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 384, "width": 384}),
                       tokenizer=tokenizer), llava, families.family_of(llava))
    for width, height in ((512, 512), (512, 420)):
        layout = attention.view_layout(llava, llava_processor, width, height)
        assert layout["base"].shape == (27, 27) and layout["n_tokens"] == 729
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    onevision = LlavaOnevisionConfig(vision_config=siglip, text_config=Qwen2Config(), image_grid_pinpoints=pinpoints,
                                     vision_feature_layer=-1, vision_feature_select_strategy="full")
    family = families.family_of(onevision)
    onevision_processor = modeling.fit_processor(LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                                        image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer, video_processor=modeling.video_stand_in({"video_processor_type": family.video_processor}),
        num_image_tokens=729, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9"),
        onevision, family)
    several = attention.view_layout(onevision, onevision_processor, 512, 420, views=3)
    assert several["n_tokens"] == 730 and several["newline"].tolist() == [729] and several["highres"].size == 0
    one = attention.view_layout(onevision, onevision_processor, 512, 512)
    assert one["n_tokens"] == 3699 and one["highres"].shape == (54, 54) and one["newline"].size == 54
    gemma = Gemma3Config(vision_config=SiglipVisionConfig(image_size=896, patch_size=14),
                         text_config=Gemma3TextConfig(), mm_tokens_per_image=256)
    gemma_processor = modeling.fit_processor(Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 896, "width": 896}), image_seq_length=256,
        tokenizer=tiny_models.train_tokenizer(["a b"], 300, tiny_vlms.GEMMA_TOKENS, tiny_vlms.GEMMA_IMAGE_TOKENS)),
        gemma, families.family_of(gemma))
    for width, height in ((512, 512), (512, 420)):
        layout = attention.view_layout(gemma, gemma_processor, width, height, views=3)
        assert layout["base"].shape == (16, 16) and layout["n_tokens"] == 256 and layout["newline"].size == 0
    qwen = Qwen2_5_VLConfig()
    qwen_processor = modeling.fit_processor(Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(), video_processor=modeling.video_stand_in({}),
        tokenizer=tiny_models.train_byte_level_tokenizer(["a b"], 300, tiny_vlms.QWEN_VL_TOKENS)),
        qwen, families.family_of(qwen))
    for (width, height), grid in (((512, 512), (18, 18)), ((512, 420), (15, 18))):  # resized to 504², 504x420
        layout = attention.view_layout(qwen, qwen_processor, width, height, views=3)
        assert layout["base"].shape == grid and layout["n_tokens"] == grid[0] * grid[1]


def test_labels_are_the_report_and_end_of_turn_and_the_prompt_is_generation(artifacts, family, sample_studies,
                                                                           tmp_path):
    name, _ = family
    replica = REPLICAS[name]
    side, newlines = replica.side, replica.newlines
    config = artifacts.run(f"{name}-qlora").config
    model, processor = training.load_training_model(config)
    studies = [next(s for s in data.by_split(sample_studies, "train") if len(s.image_paths) == n) for n in (1, 2)]
    dataset = examples.build_dataset(studies, 3, processor)
    trainer = training.make_trainer(model, processor, config, config["stages"][0], tmp_path, dataset, dataset)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    tokenizer = processor.tokenizer
    assert families.end_of_turn(processor) == replica.end  # read from the template
    image_id = model.config.image_token_id  # the positions the features fill (Gemma 3: not the processor's boi)
    for row, study in enumerate(studies):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        trained = (labels != -100).nonzero().flatten()
        assert tokenizer.decode(ids[trained]) == report_format.format_report(study.regions) + replica.end
        assert trained.tolist() == list(range(trained[0], trained[-1] + 1))
        views = data.study_images(study, 3)
        count = (ids == image_id).sum().item()
        if len(views) == 1 and newlines:  # OneVision tiles a lone view: its base tile, then the grid
            assert count == modeling.image_tokens_per_view(processor, *views[0].size) > side * side + 1
        else:
            assert count == sum(h * w + newlines for h, w in grids(processor, views, side))
        real = ids[batch["attention_mask"][row] == 1]  # the collator pads prompts on the left
        prompt = modeling.generation_inputs(processor, [views])["input_ids"][0]
        assert real[:len(prompt)].tolist() == prompt.tolist()
        assert tokenizer.decode(real[:len(prompt)]).startswith(replica.user)
        assert tokenizer.decode(real).count(tokenizer.bos_token or "no BOS") == replica.user.count("<bos>")  # one BOS
    counts = examples.token_counts(studies, processor, 3)  # the token budget counts what the collator makes
    assert [c["image_tokens"] for c in counts] == (batch["input_ids"] == image_id).sum(1).tolist()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_another_family_is_refused_naming_the_supported_ones(tmp_path, family, capsys):
    text_only, idefics = tmp_path / "qwen2", tmp_path / "idefics3"
    Qwen2Config(num_hidden_layers=1).save_pretrained(text_only)
    Idefics3Config().save_pretrained(idefics)
    for folder, model_type in ((text_only, "qwen2"), (idefics, "idefics3")):
        assert commands.main(["train", "--profile", "demo", "--artifacts-dir", str(tmp_path / "a"), "--model-id",
                              str(folder)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: {folder}: model type {model_type!r}") and "\n" not in error
        assert all(f.name in error for f in families.FAMILIES)
    name = families.family_of(AutoConfig.from_pretrained(family[1])).name
    with pytest.raises(OptionError, match=re.escape(f"VISUAL_TOKENS 'anyres' does not apply to {name} (")):
        modeling.load_processor(str(family[1]), visual_tokens="anyres")


def test_with_torchvision_a_processor_loads_through_auto_processor(family, monkeypatch):
    """Where torchvision is importable (Colab) AutoProcessor loads the processor as it is; here, where it is not (torch
    2.13 has none on PyPI), pretending it is sends a processor that takes a video processor to AutoProcessor, which
    builds the checkpoint's own video processor class (saved so by the stand-in) and so asks for torchvision. Only
    the import check is mocked: torchvision cannot be installed here."""
    folder = family[1]
    family = families.family_of(AutoConfig.from_pretrained(folder))
    loaded = modeling.auto_processor(str(folder), family)
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: object())
    if family.video_processor:
        with pytest.raises(ImportError, match=f"{family.video_processor} requires the Torchvision library"):
            modeling.auto_processor(str(folder), family)
    else:
        assert type(modeling.auto_processor(str(folder), family)) is type(loaded)


# llava-hf's other v1.6 checkpoints (tiny_vlms.LLAVA_NEXT_CHATS): (the labels' end of turn, how the generation
# prompt starts, BOS included)
LLAVA_NEXT_CHECKPOINTS = {
    "vicuna": ("</s>", "<s>USER: <image>"),  # the template ends a turn with a space: the model's EOS stops it
    "llama3": ("<|eot_id|>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>"),
    "34b": ("<|im_end|>", "<|startoftext|><|im_start|>user\n<image>"),
}


def test_llava_next_mistral_trains_on_trl_s_template(tiny_model_dir):
    processor = modeling.load_processor(str(tiny_model_dir))
    assert processor.trl_template == llava_next_training_chat_template


@pytest.mark.parametrize("checkpoint", sorted(LLAVA_NEXT_CHECKPOINTS))
def test_each_llava_next_checkpoint_trains_in_its_own_template(checkpoint, sample_studies, tmp_path):
    """TRL 1.16 has no training template for these checkpoints' (it raises for llama3's and 34b's, leaves vicuna's
    own markers): prompt-completion rows, labels exactly the report and the template's end of turn, the generation
    prompt the training prefix with one BOS, image tokens as counted; one training step."""
    end, user = LLAVA_NEXT_CHECKPOINTS[checkpoint]
    folder = tiny_vlms.build_random_llava_next(tmp_path / checkpoint, tiny_models.tokenizer_corpus(sample_studies),
                                               checkpoint)
    config = training.make_config(resolve("demo"), model_id=str(folder), max_length=None, preset="qlora", epochs=1)
    model, processor = training.load_training_model(config)
    assert processor.trl_template is None and families.end_of_turn(processor) == end
    studies = [next(s for s in data.by_split(sample_studies, "train") if len(s.image_paths) == n) for n in (1, 2)]
    dataset = examples.build_dataset(studies, 3, processor)
    trainer = training.make_trainer(model, processor, config, config["stages"][0], tmp_path / "run", dataset, dataset)
    assert trainer.args.completion_only_loss and not trainer.args.assistant_only_loss
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    tokenizer, image_id = processor.tokenizer, model.config.image_token_index
    for row, study in enumerate(studies):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        trained = (labels != -100).nonzero().flatten()
        assert tokenizer.decode(ids[trained]) == report_format.format_report(study.regions) + end
        assert trained.tolist() == list(range(trained[0], trained[-1] + 1))
        views = data.study_images(study, 3)
        assert (ids == image_id).sum().item() == len(views) * SIDE * SIDE  # "base": each view its base tile
        kept = (batch["attention_mask"][row] == 1).nonzero().flatten()  # the collator pads prompts on the left
        real, prompt = ids[kept], modeling.generation_inputs(processor, [views])["input_ids"][0]
        assert real[:len(prompt)].tolist() == prompt.tolist() and trained[0] == kept[len(prompt)]  # report next
        assert tokenizer.decode(real[:len(prompt)]).startswith(user)
        assert (real == tokenizer.bos_token_id).sum() == 1
    trainer.train()
    assert trainer.state.global_step == 1 and all(torch.isfinite(torch.tensor(log["loss"]))
                                                  for log in trainer.state.log_history if "loss" in log)
