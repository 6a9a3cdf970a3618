"""Loading, the 4-bit config, image-token budget, the shared chat template and the run loader."""
import json

import pytest
import torch
from PIL import Image

import helpers
from helpers import modeling


def test_tiny_model_is_idempotent_and_loads_like_a_hub_checkpoint(tiny_model_dir, sample_studies):
    before = (tiny_model_dir / "config.json").stat().st_mtime_ns
    assert modeling.build_tiny_llava(tiny_model_dir, ["ignored"]) == tiny_model_dir
    assert (tiny_model_dir / "config.json").stat().st_mtime_ns == before
    model, processor = modeling.load_model_and_processor(str(tiny_model_dir), image_grid_pinpoints=[[56, 112]])
    assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == [[56, 112]]
    assert processor.tokenizer.padding_side == "left"
    widths = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w % 64 == 0 for w in widths)  # bitsandbytes' CPU 4-bit layers need it


def test_bnb_config_is_nf4_double_quant_and_skips_by_full_path():
    config = modeling.bnb_4bit_config(torch.float16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.llm_int8_skip_modules == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def real_geometry_processor(tiny_model_dir, pinpoints):
    """The llava-v1.6-mistral image geometry (336 px CLIP tiles, 14 px patches) on the tiny tokenizer, offline."""
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                              patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_default_pinpoints_cost_1176_tokens_per_view_instead_of_2928(tiny_model_dir):
    default = real_geometry_processor(tiny_model_dir, modeling.DEFAULT_PINPOINTS)
    anyres = real_geometry_processor(tiny_model_dir, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    assert modeling.image_tokens_per_view(default, 672, 672) == 1176
    assert modeling.image_tokens_per_view(anyres, 672, 672) == 2928
    # a non-square view costs fewer tokens (padding rows are unpadded away), never more
    assert modeling.image_tokens_per_view(default, 512, 624) < 1176
    # and the count is what the processor really expands the placeholder into
    image = Image.new("RGB", (512, 624))
    ids = default(images=[image], text="<image>", return_tensors="pt")["input_ids"][0]
    assert (ids == default.tokenizer.convert_tokens_to_ids("<image>")).sum() == modeling.image_tokens_per_view(
        default, 512, 624)


def test_training_template_renders_one_bos_for_generation(tiny_model_dir, sample_studies):
    processor = modeling.load_processor(str(tiny_model_dir))
    template = modeling.training_chat_template(processor)
    assert template.startswith("{{ bos_token }}") and "{% generation %}" in template
    processor.chat_template = template
    assert modeling.training_chat_template(processor) == template  # idempotent
    studies = [next(s for s in sample_studies if len(s.image_paths) == n) for n in (1, 3)]
    views = [helpers.study_images(s, 3) for s in studies]
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
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        modeling.load_for_inference(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_id": "x"}))
    with pytest.raises(FileNotFoundError, match="no trained adapter"):
        modeling.load_for_inference(tmp_path)
