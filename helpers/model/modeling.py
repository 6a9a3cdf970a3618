"""The vision-language model of every supported family (`families.FAMILIES`) through one path: the visual-token
modes, a processor that counts image tokens as the model packs them, prompts tokenized exactly like training, and a
trained run loaded for inference."""
from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager, nullcontext
from functools import lru_cache

import transformers
from peft import PeftModel
from tokenizers import Tokenizer, models
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor,
                          MistralConfig, PreTrainedTokenizerFast, ProcessorMixin)
from transformers.video_processing_utils import VideoProcessorMixin
from trl.chat_template_utils import get_training_chat_template

from ..core.errors import MissingError, OptionError
from ..core.lm import left_padded, load_weights
from ..core.report_format import INSTRUCTION, user_message
from ..core.settings import get_secret
from .families import Family, family_of

# PEFT 0.21's PeftModel() reads transformers' deprecated `is_gradient_checkpointing`: its call, not ours
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

DEFAULT_MODEL_ID = "llava-hf/llava-v1.6-mistral-7b-hf"
# How many image tokens a view costs (docs/02_sft_lora_qlora.md, "Visual tokens"): the checkpoint's anyres grid (2,928 for a 512x512
# view), its base tile plus one tile of the same size (1,176), or the base tile alone (576, a plain LLaVA layout).
VISUAL_TOKENS = ("anyres", "tile", "base")
DEFAULT_VISUAL_TOKENS = "base"  # why: docs/02_sft_lora_qlora.md, "Visual tokens"
HUB_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json, 336 px tiles


@contextmanager
def base_tile_load():
    """Loading LLaVA-NeXT's checkpoint as a plain LLaVA ("base", `model_config`): its `image_newline` is unused by
    design, so transformers' load report (an UNEXPECTED key that reads like a broken checkpoint) leaves that key out.
    Set on the class for the load only: a subclass would lose transformers' weight renames, which go by class name."""
    before = LlavaForConditionalGeneration._keys_to_ignore_on_load_unexpected
    LlavaForConditionalGeneration._keys_to_ignore_on_load_unexpected = [*(before or []), r"(^|\.)image_newline$"]
    try:
        yield
    finally:
        LlavaForConditionalGeneration._keys_to_ignore_on_load_unexpected = before


def model_config(config, visual_tokens: str):
    """The checkpoint's config (a family of `families.FAMILIES`) set up for a visual-token mode (see VISUAL_TOKENS).

    "base" of a tiled (anyres) config is a plain `LlavaConfig`: `LlavaForConditionalGeneration` has exactly
    LLaVA-NeXT's parameter names but `image_newline`, so the same checkpoint loads into it and each view is its
    576-token base tile. A plain LLaVA config already is its base layout.
    """
    if visual_tokens not in VISUAL_TOKENS:
        raise OptionError(f"unknown VISUAL_TOKENS {visual_tokens!r}; choose one of {VISUAL_TOKENS}")
    family = family_of(config)
    if visual_tokens not in family.visual_tokens:
        raise OptionError(f"VISUAL_TOKENS {visual_tokens!r} does not apply to {family.name} "
                          f"({config.name_or_path or 'model'}); choose one of {family.visual_tokens}")
    config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's config stays as loaded
    side = getattr(config.vision_config, "image_size", None)  # Qwen2.5-VL's tower has none: a dynamic resolution
    if visual_tokens == "tile":
        config.image_grid_pinpoints = [[side, side]]
    if visual_tokens == "base" and "anyres" in family.visual_tokens:
        config = LlavaConfig(
            vision_config=config.vision_config, text_config=config.text_config,
            image_token_index=config.image_token_index, projector_hidden_act=config.projector_hidden_act,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_feature_layer=config.vision_feature_layer, multimodal_projector_bias=config.multimodal_projector_bias,
            tie_word_embeddings=config.tie_word_embeddings,
            image_seq_length=(side // config.vision_config.patch_size) ** 2)
    return config


@lru_cache(maxsize=None)
def checkpoint_family(model_id) -> Family:
    """The family of a checkpoint (hub id or folder), its config read once: what a run's LoRA targets and loss form
    follow."""
    return family_of(AutoConfig.from_pretrained(str(model_id), token=get_secret("HF_TOKEN")))


def vision_layers_used(config) -> int:
    """How many vision-tower layers the image features pass through: hidden state i is the output of layer i - 1,
    and `vision_feature_layer` (one index or several) picks the hidden states the projector reads."""
    chosen = getattr(config, "vision_feature_layer", -1)  # Gemma 3, Qwen2.5-VL have none: the last layer's output
    hidden_states = config.vision_config.num_hidden_layers + 1  # the embeddings, then one per layer
    return max(i % hidden_states for i in (chosen if isinstance(chosen, (list, tuple)) else [chosen]))


def fit_processor(processor, config, family):
    """Make the processor count image tokens exactly as the model packs them, from the model's own config.

    LlavaNextProcessor defaults patch_size, vision_feature_select_strategy and num_additional_image_tokens to
    None/None/0 and relies on the hub's processor_config.json; with 0 extra tokens a CLIP model fails with "Image
    features and image tokens do not match". Values the processor already has must agree with the config.
    For a "base" config the processor becomes a `LlavaProcessor` whose image processor squashes each view to the
    tile size, exactly as LLaVA-NeXT makes its base tile (no center crop). A config without a feature strategy
    (Gemma 3, Qwen2.5-VL: their processors count from their own settings) leaves the processor as it is.
    """
    vision = config.vision_config
    expected = {"patch_size": vision.patch_size, "vision_feature_select_strategy": config.vision_feature_select_strategy,
                "num_additional_image_tokens": family.cls_tokens} if hasattr(config, "vision_feature_select_strategy") \
        else {}
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
    # how it trains (training_chat_template, examples.training_text), neither saved; TRL is asked about the template
    # the processor came with, before training_chat_template replaces it
    processor.family, processor.trl_template = family, trl_training_template(processor)
    if hasattr(config, "image_grid_pinpoints"):
        processor.image_processor.image_grid_pinpoints = [list(p) for p in config.image_grid_pinpoints]
    return processor


def load_processor(model_id: str = DEFAULT_MODEL_ID, *, visual_tokens: str = DEFAULT_VISUAL_TOKENS, token: str | None = None,
                   processor_id: str | None = None):
    """The processor (for token budgets, training and generation) fitted to the model's config in this mode.

    `processor_id` loads it from elsewhere (a trained run's adapter folder, whose processor carries the chat
    template used in training).
    """
    checkpoint = AutoConfig.from_pretrained(model_id, token=token)
    config = model_config(checkpoint, visual_tokens)
    processor = auto_processor(processor_id or model_id, family_of(checkpoint), token)
    # With torchvision installed (Colab) AutoProcessor picks the torchvision image processor, whose tile and anyres
    # pixels differ from the PIL one's by up to 0.015: the PIL backend everywhere, so a run trained in one place
    # generates from the same pixels in another
    processor.image_processor = AutoImageProcessor.from_pretrained(processor_id or model_id, token=token,
                                                                   backend="pil")
    processor = fit_processor(processor, config, family_of(checkpoint))
    left_padded(processor.tokenizer)  # for batched generation; TRL's collator pads training batches its own way
    return processor


class ImageOnlyVideoProcessor(VideoProcessorMixin):
    """The video processor of a processor that takes one (`Family.video_processor`) where torchvision is missing:
    never called (the project sends images only), and saved as the checkpoint's own (`saved`), so a folder written
    with it (a run's adapter folder) loads through AutoProcessor where torchvision is installed."""

    def __init__(self, saved: dict):
        super().__init__()
        self.saved = saved

    def preprocess(self, videos, **kwargs):
        raise NotImplementedError("this project's processors take images only")

    def to_dict(self) -> dict:
        return dict(self.saved)


def video_stand_in(saved: dict) -> ImageOnlyVideoProcessor:
    """An `ImageOnlyVideoProcessor` saved as `saved`, and the export a processor's class check looks it up by (the
    name torchvision's import would have set; the same class)."""
    transformers.VideoProcessorMixin = VideoProcessorMixin
    return ImageOnlyVideoProcessor(saved)


def auto_processor(model_id: str, family: Family, token: str | None = None):
    """`AutoProcessor.from_pretrained`, or, for a family whose processor takes a video processor where torchvision
    is missing, the same processor rebuilt from its parts around an `ImageOnlyVideoProcessor`.

    Why: PyPI has no torchvision for torch 2.13, and without it transformers 5.23 neither loads such a processor
    ("requires torchvision") nor constructs one: its class check looks `VideoProcessorMixin` up among transformers'
    exports, which leave the name out without torchvision (the mixin itself needs none). Colab has torchvision: there
    this is AutoProcessor exactly.
    """
    if not family.video_processor or importlib.util.find_spec("torchvision"):
        return AutoProcessor.from_pretrained(model_id, token=token)
    parts, _ = ProcessorMixin.get_processor_dict(model_id, token=token)
    saved = parts.pop("video_processor", None) or VideoProcessorMixin.get_video_processor_dict(model_id, token=token)[0]
    cls = getattr(transformers, parts.pop("processor_class"))
    return cls(image_processor=AutoImageProcessor.from_pretrained(model_id, token=token, backend="pil"),
               tokenizer=AutoTokenizer.from_pretrained(model_id, token=token), video_processor=video_stand_in(saved),
               **{k: v for k, v in parts.items() if k != "image_processor"})


def load_model_and_processor(model_id: str = DEFAULT_MODEL_ID, *, visual_tokens: str = DEFAULT_VISUAL_TOKENS,
                             load_in_4bit: bool = False, dtype=None, attn_implementation: str | None = None,
                             token: str | None = None, processor_id: str | None = None):
    """Model + processor in a visual-token mode; the processor counts image tokens the way the model packs them."""
    config = model_config(AutoConfig.from_pretrained(model_id, token=token), visual_tokens)
    processor = load_processor(model_id, visual_tokens=visual_tokens, token=token, processor_id=processor_id)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    base = visual_tokens == "base"
    with base_tile_load() if base else nullcontext():
        model = load_weights(AutoModelForImageTextToText, model_id, config=config, load_in_4bit=load_in_4bit,
                             dtype=dtype, token=token, **extra)
    return model, processor


def image_tokens_per_view(processor, width: int, height: int, views: int = 1) -> int:
    """How many `<image>` positions the processor expands one view of this size into, in a prompt of `views` views
    (the hook vLLM uses too, which knows one view only: several views of a `Family.view_newline` family are each
    their base tile and a newline).

    LlavaProcessor reads the tile from `crop_size`, which SigLIP's image processor lacks: it resizes to `size`.
    """
    if views > 1 and processor.family.view_newline:
        return processor.num_image_tokens + 1
    image_processor = processor.image_processor
    return processor._get_num_multimodal_tokens(
        image_sizes=[(height, width)],
        crop_size=dict(getattr(image_processor, "crop_size", None) or image_processor.size)).num_image_tokens[0]


def trl_training_template(processor) -> str | None:
    """TRL's training variant of the processor's chat template, or None where TRL has none for this exact text.

    With one, rows are messages and TRL's markers put the loss on the report and its end of turn (assistant-only
    loss); without, rows are the generation prompt and the report + `families.end_of_turn` as strings
    (completion-only loss: examples.training_text). TRL 1.16 knows templates by their text: llava-v1.6-mistral's,
    Gemma 3's, Qwen2.5-VL's; it raises for one it does not know (llama3-llava-next's, llava-v1.6-34b's) and returns
    None for one with markers of its own (vicuna's, OneVision's, whose markers leave <|im_end|> out)."""
    if not processor.chat_template:
        return None
    try:
        return get_training_chat_template(processor)
    except ValueError:
        return None


def training_chat_template(processor) -> str:
    """The chat template used to train and then to generate, with BOS rendered by it: TRL's training variant where
    it has one (`trl_training_template`), else the checkpoint's own (its rows are prompt-completion strings).

    TRL's collator tokenizes with `add_special_tokens=False` (no BOS) while a plain `processor(text)` adds
    one; rendering `{{ bos_token }}` in the template gives exactly one BOS on both paths, because
    `processor.apply_chat_template(tokenize=True)` stops adding it when the text already starts with it.
    """
    template = processor.trl_template or processor.chat_template
    tokenizer = processor.tokenizer
    adds_bos = tokenizer.bos_token is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    if adds_bos and "bos_token" not in template:
        template = "{{ bos_token }}" + template
    return template


def generation_inputs(processor, views: list[list], model=None):
    """Batched model inputs for generation, one list of PIL views per study, tokenized exactly like training.

    With `model`, the inputs are on its device and the pixel values in its dtype.
    """
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


def load_for_inference(run, load_in_4bit: bool | None = None, attn_implementation: str | None = None, *,
                       small_gpu: bool = False):
    """Base model + trained adapter of a notebook-02 run (`runs.Run`), with that run's processor and settings.

    Returns (model, processor, config). `load_in_4bit=None`: the way it was trained, or 4-bit when `small_gpu`
    (`settings.inference_4bit`). The run must have been trained with the prompt this code generates with.
    """
    config = run.config
    if not run.trained:
        raise MissingError(f"{run.adapter_dir}: no trained adapter (adapter_config.json missing); run notebook "
                           f"02 (python -m helpers train) to the end for run {run.name!r} first")
    if config["instruction"] != INSTRUCTION:
        raise ValueError(f"{run.config_path}: the run was trained with another instruction:\n"
                         f"{config['instruction']!r}\nthis code prompts with\n{INSTRUCTION!r}")
    model, processor = load_model_and_processor(
        config["model_id"], visual_tokens=config["visual_tokens"],
        load_in_4bit=(config["load_in_4bit"] or small_gpu) if load_in_4bit is None else load_in_4bit,
        attn_implementation=attn_implementation, processor_id=str(run.adapter_dir), token=get_secret("HF_TOKEN"))
    model = PeftModel.from_pretrained(model, run.adapter_dir)
    model.eval()
    return model, processor, config


@lru_cache(maxsize=None)
def _real_geometry_processor(visual_tokens: str):
    """llava-v1.6-mistral-7b's image geometry (CLIP 336/14, the hub's pinpoints) with a one-token tokenizer, offline."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")),
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                             text_config=MistralConfig(), image_grid_pinpoints=HUB_PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=HUB_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return fit_processor(processor, model_config(config, visual_tokens), family_of(config))


def visual_tokens_per_view(width: int, height: int, mode: str) -> int:
    """Image tokens of one width x height view for llava-v1.6-mistral-7b in a visual-token mode (the real processor
    classes, configured offline, count them)."""
    return image_tokens_per_view(_real_geometry_processor(mode), width, height)
