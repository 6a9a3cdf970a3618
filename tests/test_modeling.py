"""Loading, the 4-bit config, image-token budget, the shared chat template and the run loader."""
import json

import pytest
import torch

from helpers.core import data, lm, runs
from helpers.model import families, modeling
from helpers.demo import tiny_models


@pytest.mark.parametrize("mode", modeling.VISUAL_TOKENS)
def test_tiny_model_loads_like_a_hub_checkpoint_in_every_mode(tiny_model_dir, load_tiny, mode):
    before = (tiny_model_dir / "config.json").stat().st_mtime_ns
    assert tiny_models.build_random_llava(tiny_model_dir, ["ignored"]) == tiny_model_dir  # idempotent
    assert (tiny_model_dir / "config.json").stat().st_mtime_ns == before
    model, processor = load_tiny(mode)
    side = model.config.vision_config.image_size
    if mode == "base":  # a plain LLaVA: same weights but image_newline, the base tile alone
        assert type(model).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
        assert not hasattr(model.config, "image_grid_pinpoints")
    else:
        hub_scaled = [[h * side // 336, w * side // 336] for h, w in modeling.HUB_PINPOINTS]
        grid = [[side, side]] if mode == "tile" else hub_scaled
        assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == grid
    assert (processor.patch_size, processor.vision_feature_select_strategy,
            processor.num_additional_image_tokens) == (14, "default", 1)  # filled in from the model's config
    assert processor.tokenizer.padding_side == "left"
    widths = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w % 64 == 0 for w in widths)  # bitsandbytes' CPU 4-bit layers need it


def test_base_mode_is_llava_next_without_image_newline(load_tiny, sample_studies):
    """The same checkpoint weights in both classes, and the base processor's pixels are LLaVA-NeXT's base tile."""
    (base, base_processor), (anyres, anyres_processor) = load_tiny("base"), load_tiny("anyres")
    base_weights, anyres_weights = base.state_dict(), anyres.state_dict()
    assert set(anyres_weights) - set(base_weights) == {"model.image_newline"} and set(base_weights) <= set(anyres_weights)
    assert all(torch.equal(base_weights[k], anyres_weights[k]) for k in base_weights)
    view = data.study_images(sample_studies[0], 1)[0]
    squashed = base_processor.image_processor(images=[view], return_tensors="pt")["pixel_values"]
    tiles = anyres_processor.image_processor(images=[view], return_tensors="pt")["pixel_values"]
    assert squashed.shape[1:] == tiles.shape[2:] and torch.allclose(squashed[0], tiles[0, 0], atol=1e-6)


def test_visual_tokens_per_view_for_the_real_geometry():
    assert [modeling.visual_tokens_per_view(512, 512, m) for m in ("anyres", "tile", "base")] == [2928, 1176, 576]
    # a non-square view costs fewer tokens in the LLaVA-NeXT modes (padding rows are unpadded away), never more
    assert modeling.visual_tokens_per_view(512, 624, "tile") < 1176
    assert modeling.visual_tokens_per_view(512, 624, "base") == 576
    with pytest.raises(ValueError, match="unknown VISUAL_TOKENS"):
        modeling.visual_tokens_per_view(512, 512, "grid")


@pytest.fixture(scope="module")
def real_geometry_dir(tmp_path_factory, sample_studies):
    """A stand-in with llava-v1.6-mistral-7b's image geometry (CLIP 336/14, the hub's five pinpoints), tiny widths;
    like the hub's, its saved processor has no patch size, feature strategy or extra-token count."""
    return tiny_models.build_random_llava(tmp_path_factory.mktemp("real") / "geometry",
                                     tiny_models.tokenizer_corpus(sample_studies), image_size=336)


@pytest.mark.parametrize("mode", modeling.VISUAL_TOKENS)
def test_real_geometry_runs_a_three_view_forward_pass(real_geometry_dir, sample_studies, mode):
    from transformers import AutoProcessor

    bare = AutoProcessor.from_pretrained(real_geometry_dir)
    assert (bare.patch_size, bare.num_additional_image_tokens) == (None, 0)  # what fails without fit_processor
    model, processor = modeling.load_model_and_processor(str(real_geometry_dir), visual_tokens=mode)
    study = next(s for s in sample_studies if len(s.image_paths) == 3)
    views = data.study_images(study, 3)
    inputs = modeling.generation_inputs(processor, [views], model)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    expected = [modeling.visual_tokens_per_view(*v.size, mode) for v in views]
    assert (inputs["input_ids"] == image_id).sum() == sum(expected)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(logits).all()


def test_processor_that_disagrees_with_the_model_is_refused(tiny_model_dir):
    from transformers import AutoConfig, AutoProcessor

    checkpoint = AutoConfig.from_pretrained(tiny_model_dir)
    config = modeling.model_config(checkpoint, "tile")
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.patch_size = 16
    with pytest.raises(ValueError, match="patch_size=16 but the model's config says 14"):
        modeling.fit_processor(processor, config, families.family_of(checkpoint))


def test_bnb_config_is_nf4_double_quant_and_skips_by_full_path():
    config = lm.bnb_4bit_config(torch.float16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.llm_int8_skip_modules == ["model.vision_tower", "model.multi_modal_projector", "model.visual", "lm_head"]


def test_training_template_renders_one_bos_for_generation(tiny_model_dir, sample_studies):
    processor = modeling.load_processor(str(tiny_model_dir))
    template = modeling.training_chat_template(processor)
    assert template.startswith("{{ bos_token }}") and "{% generation %}" in template
    processor.chat_template = template
    assert modeling.training_chat_template(processor) == template  # idempotent
    studies = [next(s for s in sample_studies if len(s.image_paths) == n) for n in (1, 3)]
    views = [data.study_images(s, 3) for s in studies]
    inputs = modeling.generation_inputs(processor, views)
    bos, pad = processor.tokenizer.bos_token_id, processor.tokenizer.pad_token_id
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for row, images in zip(inputs["input_ids"], views):
        assert (row == bos).sum() == 1
        first = (row != pad).nonzero()[0].item()  # left padding: the prompt ends every row
        assert row[first] == bos
        assert (row == image_id).sum() == sum(modeling.image_tokens_per_view(processor, *v.size) for v in images)
    assert processor.decode(inputs["input_ids"][0], skip_special_tokens=True).rstrip().endswith("[/INST]")


def test_load_for_inference_names_what_is_missing(tmp_path):
    run = runs.Artifacts(tmp_path).run("r")
    with pytest.raises(FileNotFoundError, match="config.json not found: train run 'r' with notebook 02"):
        modeling.load_for_inference(run)
    run.train_dir.mkdir(parents=True)
    run.config_path.write_text(json.dumps({"model_id": "x"}))
    with pytest.raises(FileNotFoundError, match="no trained adapter"):
        modeling.load_for_inference(run)


@pytest.mark.parametrize("mode", modeling.VISUAL_TOKENS)
def test_processor_pins_the_pil_image_backend(tiny_model_dir, monkeypatch, mode):
    """With torchvision installed (Colab) AutoProcessor picks the torchvision image processor; load_processor replaces
    it with the PIL one, whatever AutoProcessor picked, so training and generation see the same pixels anywhere."""
    from transformers import AutoProcessor
    from transformers.image_processing_backends import PilBackend

    real = AutoProcessor.from_pretrained

    def torchvision_like(*args, **kwargs):  # what AutoProcessor gives beside torchvision: another image processor
        processor = real(*args, **kwargs)
        processor.image_processor = object()
        return processor

    monkeypatch.setattr(modeling.AutoProcessor, "from_pretrained", torchvision_like)
    processor = modeling.load_processor(str(tiny_model_dir), visual_tokens=mode)
    assert isinstance(processor.image_processor, PilBackend)
    monkeypatch.undo()
    assert processor.image_processor.to_dict() == modeling.load_processor(str(tiny_model_dir),
                                                                         visual_tokens=mode).image_processor.to_dict()
