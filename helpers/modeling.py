"""LLaVA-NeXT loading (hub id or local folder, 4-bit or not) and the tiny offline stand-in used by the demo and tests."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DEFAULT_MODEL_ID = "llava-hf/llava-v1.6-mistral-7b-hf"
# How many image tokens a view costs (README, "Visual tokens"): the checkpoint's anyres grid (2,928 for a 512x512
# view), its base tile plus one tile of the same size (1,176), or the base tile alone (576, a plain LLaVA layout).
VISUAL_TOKENS = ("anyres", "tile", "base")
DEFAULT_VISUAL_TOKENS = "base"  # why: README, "Visual tokens"
HUB_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json, 336 px tiles
TINY_IMAGE_SIZE = 56  # tiny CLIP tile: 4x4 patches of 14 px
# Vision tower, projector and lm_head stay in full precision under 4-bit. transformers 5 matches
# `llm_int8_skip_modules` against the start of the module path, so bare names ("vision_tower") are ignored.
SKIP_QUANTIZATION = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
# Extra vision-tower outputs per tile that the processor must count: CLIP prepends a CLS token, SigLIP none.
EXTRA_VISION_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def bnb_4bit_config(compute_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=SKIP_QUANTIZATION,
    )


def load_weights(auto_class, model_id: str, *, load_in_4bit: bool = False, dtype=None, token: str | None = None,
                 **kwargs):
    """`auto_class.from_pretrained` in 4-bit (nf4, see bnb_4bit_config) or in `dtype`, straight onto the GPU when
    there is one (device_map: shards go to the GPU as they are read, the model is never whole in CPU memory)."""
    import torch

    from .settings import default_dtype

    dtype = dtype or default_dtype()
    kwargs = {"dtype": dtype, "token": token, "device_map": {"": 0 if torch.cuda.is_available() else "cpu"}, **kwargs}
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(dtype)
    return auto_class.from_pretrained(model_id, **kwargs)


def model_config(config, visual_tokens: str):
    """The checkpoint's LLaVA-NeXT config set up for a visual-token mode (see VISUAL_TOKENS).

    "base" is a plain `LlavaConfig`: `LlavaForConditionalGeneration` has exactly LLaVA-NeXT's parameter names but
    `image_newline`, so the same checkpoint loads into it and each view is its 576-token base tile.
    """
    from transformers import LlavaConfig

    if visual_tokens not in VISUAL_TOKENS:
        raise ValueError(f"unknown VISUAL_TOKENS {visual_tokens!r}; choose one of {VISUAL_TOKENS}")
    if config.model_type != "llava_next":
        raise ValueError(f"{config.name_or_path or 'model'}: model type {config.model_type!r}; the visual-token "
                         f"modes need a LLaVA-NeXT checkpoint (model type 'llava_next')")
    config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's config stays as loaded
    side = config.vision_config.image_size
    if visual_tokens == "tile":
        config.image_grid_pinpoints = [[side, side]]
    if visual_tokens == "base":
        config = LlavaConfig(
            vision_config=config.vision_config, text_config=config.text_config,
            image_token_index=config.image_token_index, projector_hidden_act=config.projector_hidden_act,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_feature_layer=config.vision_feature_layer, multimodal_projector_bias=config.multimodal_projector_bias,
            tie_word_embeddings=config.tie_word_embeddings,
            image_seq_length=(side // config.vision_config.patch_size) ** 2)
    return config


def fit_processor(processor, config):
    """Make the processor count image tokens exactly as the model packs them, from the model's own config.

    LlavaNextProcessor defaults patch_size, vision_feature_select_strategy and num_additional_image_tokens to
    None/None/0 and relies on the hub's processor_config.json; with 0 extra tokens a CLIP model fails with "Image
    features and image tokens do not match". Values the processor already has must agree with the config.
    For a "base" config the processor becomes a `LlavaProcessor` whose image processor squashes each view to the
    tile size, exactly as LLaVA-NeXT makes its base tile (no center crop).
    """
    from transformers import CLIPImageProcessorPil, LlavaNextProcessor, LlavaProcessor

    vision = config.vision_config
    if vision.model_type not in EXTRA_VISION_TOKENS:
        raise ValueError(f"vision tower {vision.model_type!r}: unknown number of extra tokens per tile "
                         f"(known: {EXTRA_VISION_TOKENS})")
    expected = {"patch_size": vision.patch_size, "vision_feature_select_strategy": config.vision_feature_select_strategy,
                "num_additional_image_tokens": EXTRA_VISION_TOKENS[vision.model_type]}
    for name, value in expected.items():
        current = getattr(processor, name, None)
        if current not in (None, 0, value):
            raise ValueError(f"processor {name}={current!r} but the model's config says {value!r}: the image-token "
                             f"count would not match the image features")
    if config.model_type == "llava" and isinstance(processor, LlavaNextProcessor):
        source, side = processor.image_processor, vision.image_size
        squash = CLIPImageProcessorPil(size={"height": side, "width": side}, crop_size={"height": side, "width": side},
                                       do_center_crop=False, resample=source.resample, image_mean=source.image_mean,
                                       image_std=source.image_std, rescale_factor=source.rescale_factor)
        processor = LlavaProcessor(image_processor=squash, tokenizer=processor.tokenizer,
                                   chat_template=processor.chat_template, **expected)
    for name, value in expected.items():
        setattr(processor, name, value)
    if hasattr(config, "image_grid_pinpoints"):
        processor.image_processor.image_grid_pinpoints = [list(p) for p in config.image_grid_pinpoints]
    return processor


def load_processor(model_id: str = DEFAULT_MODEL_ID, *, visual_tokens: str = DEFAULT_VISUAL_TOKENS, token: str | None = None,
                   processor_id: str | None = None):
    """The processor (for token budgets, training and generation) fitted to the model's config in this mode.

    `processor_id` loads it from elsewhere (a trained run's adapter folder, whose processor carries the chat
    template used in training).
    """
    from transformers import AutoConfig, AutoProcessor

    config = model_config(AutoConfig.from_pretrained(model_id, token=token), visual_tokens)
    processor = fit_processor(AutoProcessor.from_pretrained(processor_id or model_id, token=token), config)
    # Batched generation needs left padding; training pads right through TRL's collator either way.
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


def load_model_and_processor(model_id: str = DEFAULT_MODEL_ID, *, visual_tokens: str = DEFAULT_VISUAL_TOKENS,
                             load_in_4bit: bool = False, dtype=None, attn_implementation: str | None = None,
                             token: str | None = None, processor_id: str | None = None):
    """Model + processor in a visual-token mode; the processor counts image tokens the way the model packs them."""
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

    config = model_config(AutoConfig.from_pretrained(model_id, token=token), visual_tokens)
    processor = load_processor(model_id, visual_tokens=visual_tokens, token=token, processor_id=processor_id)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model_class = LlavaForConditionalGeneration if visual_tokens == "base" else AutoModelForImageTextToText
    model = load_weights(model_class, model_id, config=config, load_in_4bit=load_in_4bit, dtype=dtype, token=token,
                         **extra)
    return model, processor


def image_tokens_per_view(processor, width: int, height: int) -> int:
    """How many `<image>` positions the processor expands one view of this size into (the hook vLLM uses too)."""
    return processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]


def training_chat_template(processor) -> str:
    """The chat template used to train and then to generate: TRL's training variant, with BOS rendered by it.

    TRL's collator tokenizes with `add_special_tokens=False` (no BOS) while a plain `processor(text)` adds
    one; rendering `{{ bos_token }}` in the template gives exactly one BOS on both paths, because
    `processor.apply_chat_template(tokenize=True)` stops adding it when the text already starts with it.
    """
    from trl.chat_template_utils import get_training_chat_template

    template = get_training_chat_template(processor) or processor.chat_template  # None: already has markers
    tokenizer = processor.tokenizer
    adds_bos = tokenizer.bos_token is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    if adds_bos and "bos_token" not in template:
        template = "{{ bos_token }}" + template
    return template


def generation_inputs(processor, views: list[list], model=None):
    """Batched model inputs for generation, one list of PIL views per study, tokenized exactly like training.

    With `model`, the inputs are on its device and the pixel values in its dtype.
    """
    from .reports import user_message

    conversations = []
    for images in views:
        message = user_message(len(images))
        content = iter(images)
        message["content"] = [{**part, "image": next(content)} if part["type"] == "image" else part
                              for part in message["content"]]
        conversations.append([message])
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    if model is not None:
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def load_for_inference(run_dir, load_in_4bit: bool | None = None, attn_implementation: str | None = None):
    """Base model + trained adapter of a notebook-02 run, with that run's processor, pinpoints and settings.

    Returns (model, processor, config); `load_in_4bit=None` loads the base model the way it was trained.
    """
    from peft import PeftModel

    from .env import get_secret
    from .training import load_run_config

    config = load_run_config(run_dir)
    adapter_dir = Path(run_dir) / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no trained adapter (adapter_config.json missing); run notebook 02 "
                                f"to the end for this run first")
    model, processor = load_model_and_processor(
        config["model_id"], visual_tokens=config["visual_tokens"],
        load_in_4bit=config["load_in_4bit"] if load_in_4bit is None else load_in_4bit,
        attn_implementation=attn_implementation, processor_id=str(adapter_dir), token=get_secret("HF_TOKEN"))
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, processor, config


def _train_tokenizer(texts: list[str], vocab_size: int):
    """A small BPE tokenizer in the Llama/Mistral style (metaspace, <s> prepended), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    # "\n" is its own token, as in Mistral's vocabulary, so no token spans two report sections
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                       pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]{}/-_*#%&+=<>|\n▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=1_000_000)


def build_tiny_llava(out_dir: str | Path, texts: list[str], *, image_size: int = TINY_IMAGE_SIZE, vocab_size: int = 640,
                     seed: int = 0) -> Path:
    """Save a random-weight LLaVA-NeXT with the real architecture and chat template, loadable like a hub id.

    Its grid is the hub checkpoint's five pinpoints scaled to `image_size` (336: the real geometry). Like the hub's,
    the saved processor leaves patch size, feature strategy and extra tokens to `fit_processor`. Widths are
    multiples of 64 so bitsandbytes' 4-bit layers also run on the CPU. Nothing is downloaded.
    """
    import torch
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, MistralConfig)
    from trl.chat_template_utils import llava_next_chat_template  # the template llava-v1.6-mistral-7b-hf ships

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer(texts, vocab_size)
    pinpoints = [[h * image_size // 336, w * image_size // 336] for h, w in HUB_PINPOINTS]
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=14, projection_dim=64)
    # initializer_range 0.1, not 0.02: with tiny random weights the frozen lm_head would keep the logits near
    # uniform, and LoRA could not even overfit two reports (tests/test_training.py checks that it can).
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, sliding_window=None, initializer_range=0.1)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_seq_length=(image_size // 14) ** 2)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=llava_next_chat_template)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "TINY_RANDOM_MODEL.json").write_text(json.dumps(
        {"note": "random weights, built offline by helpers.build_tiny_llava; outputs are meaningless",
         "seed": seed, "vocab_size": len(tokenizer)}, indent=2))
    return out_dir


@lru_cache(maxsize=None)
def _real_geometry_processor(visual_tokens: str):
    """llava-v1.6-mistral-7b's image geometry (CLIP 336/14, the hub's pinpoints) with a one-token tokenizer, offline."""
    from tokenizers import Tokenizer, models
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor,
                              MistralConfig, PreTrainedTokenizerFast)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")),
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                             text_config=MistralConfig(), image_grid_pinpoints=HUB_PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=HUB_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return fit_processor(processor, model_config(config, visual_tokens))


def visual_tokens_per_view(width: int, height: int, mode: str) -> int:
    """Image tokens of one width x height view for llava-v1.6-mistral-7b in a visual-token mode (the real processor
    classes, configured offline, count them)."""
    return image_tokens_per_view(_real_geometry_processor(mode), width, height)


def tokenizer_corpus(studies) -> list[str]:
    """Text the tiny tokenizer is trained on: every report of `studies`, the targets' headers and the prompt."""
    from .reports import INSTRUCTION, format_report

    texts = [INSTRUCTION, "[INST] [/INST]"]
    for study in studies:
        if study.regions:
            texts.append(format_report(study.regions))
        if study.original_report:
            texts.append(study.original_report)
    return texts
