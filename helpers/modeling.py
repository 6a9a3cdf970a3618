"""LLaVA-NeXT loading (hub id or local folder, 4-bit or not) and the tiny offline stand-in used by the demo and tests."""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MODEL_ID = "llava-hf/llava-v1.6-mistral-7b-hf"
DEFAULT_PINPOINTS = [[336, 336]]  # base tile + one 336 tile: 1,176 tokens per view instead of 2,928 with anyres
TINY_IMAGE_SIZE = 56  # tiny CLIP tile: 4x4 patches of 14 px
# Vision tower, projector and lm_head stay in full precision under 4-bit. transformers 5 matches
# `llm_int8_skip_modules` against the start of the module path, so bare names ("vision_tower") are ignored.
SKIP_QUANTIZATION = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


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
    """`auto_class.from_pretrained` in 4-bit (nf4, see bnb_4bit_config) or in `dtype`, on the GPU when there is one."""
    import torch

    from .env import compute_dtype

    dtype = dtype or compute_dtype()
    kwargs = {"dtype": dtype, "token": token, **kwargs}
    if load_in_4bit:
        kwargs.update(quantization_config=bnb_4bit_config(dtype),
                      device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    model = auto_class.from_pretrained(model_id, **kwargs)
    if not load_in_4bit and torch.cuda.is_available():
        model.to("cuda")
    return model


def load_processor(model_id: str = DEFAULT_MODEL_ID, *, image_grid_pinpoints=None, token: str | None = None):
    """The processor alone (for token budgets), with the pinpoints and padding used everywhere in this project."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id, token=token)
    if image_grid_pinpoints is not None and hasattr(processor.image_processor, "image_grid_pinpoints"):
        processor.image_processor.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints]
    # Batched generation needs left padding; training pads right through TRL's collator either way.
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


def load_model_and_processor(model_id: str = DEFAULT_MODEL_ID, *, load_in_4bit: bool = False, dtype=None,
                             image_grid_pinpoints=None, attn_implementation: str | None = None, token: str | None = None,
                             processor_id: str | None = None):
    """Model + processor through the Auto classes, so other LLaVA-family ids work unchanged.

    `image_grid_pinpoints` is written into both the processor (which counts image tokens) and the model
    config (which packs image features): if they disagree the model fails with "Image features and image
    tokens do not match". `processor_id` loads the processor from elsewhere (a trained run's adapter
    folder, whose processor carries the chat template used in training).
    """
    from transformers import AutoModelForImageTextToText

    processor = load_processor(processor_id or model_id, image_grid_pinpoints=image_grid_pinpoints, token=token)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = load_weights(AutoModelForImageTextToText, model_id, load_in_4bit=load_in_4bit, dtype=dtype, token=token,
                         **extra)
    if image_grid_pinpoints is not None and hasattr(processor.image_processor, "image_grid_pinpoints"):
        model.config.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints]
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
        config["model_id"], load_in_4bit=config["load_in_4bit"] if load_in_4bit is None else load_in_4bit,
        image_grid_pinpoints=config["image_grid_pinpoints"], attn_implementation=attn_implementation,
        processor_id=str(adapter_dir), token=get_secret("HF_TOKEN"))
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


def build_tiny_llava(out_dir: str | Path, texts: list[str], *, image_grid_pinpoints=None, vocab_size: int = 640,
                     seed: int = 0) -> Path:
    """Save a random-weight LLaVA-NeXT with the real architecture and chat template, loadable like a hub id.

    Widths are multiples of 64 so bitsandbytes' 4-bit layers also run on the CPU. Nothing is downloaded.
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
    pinpoints = [list(p) for p in (image_grid_pinpoints or [[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]])]
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TINY_IMAGE_SIZE, patch_size=14, projection_dim=64)
    # initializer_range 0.1, not 0.02: with tiny random weights the frozen lm_head would keep the logits near
    # uniform, and LoRA could not even overfit two reports (tests/test_training.py checks that it can).
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, sliding_window=None, initializer_range=0.1)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_seq_length=(TINY_IMAGE_SIZE // 14) ** 2)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_grid_pinpoints=pinpoints, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", chat_template=llava_next_chat_template,
                                   num_additional_image_tokens=1)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "TINY_RANDOM_MODEL.json").write_text(json.dumps(
        {"note": "random weights, built offline by helpers.build_tiny_llava; outputs are meaningless",
         "seed": seed, "vocab_size": len(tokenizer)}, indent=2))
    return out_dir


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
