"""The model families the project trains, and what differs between them, in one table (`FAMILIES`).

What follows from the config itself is computed, not tabled (`attention.view_layout`): a view's grid side is the
vision tower's image size over its patch size (Gemma 3: the square root of `mm_tokens_per_image`; Qwen2.5-VL: the
view resized by its processor, over the patch size times `spatial_merge_size`), and a view has an anyres grid with a
newline per row only when the config has `image_grid_pinpoints`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import OptionError

# PEFT full-matches these against module paths such as "model.language_model.layers.0.self_attn.q_proj".
LLM_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_MARKER = "\x00report\x00"  # no chat template renders this itself: what follows it is the end of a turn


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # the checkpoint's config.model_type
    vision_type: str  # its vision_config.model_type
    visual_tokens: tuple[str, ...]  # the VISUAL_TOKENS modes that apply (modeling.VISUAL_TOKENS)
    cls_tokens: int  # vision-tower outputs per tile beyond the patches, which the processor counts (CLIP's CLS)
    llm_targets: str = LLM_TARGETS
    vision_tower: str = "vision_tower"  # module names under the model (`model.<name>`)
    projector: str = "multi_modal_projector"
    # True: with several views in a prompt each view is its base tile and one newline token (LLaVA-OneVision)
    view_newline: bool = False
    # the video processor the checkpoint's processor takes ("" none): without torchvision it is a stand-in
    # (modeling.load_processor), saved under this name
    video_processor: str = ""

    # the vision tower's attention projections in layer {layers} (a regex alternation), under `model.<vision_tower>`
    vision_layer: str = r"encoder\.layers\.({layers})\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

    def vision_targets(self, layers: int) -> str:
        """LoRA targets in the first `layers` layers of the vision tower: those whose output the image features read.

        LLaVA takes the features from `vision_feature_layer` (-2: the input of the last layer), so LoRA on a later
        layer would get no gradient, and DDP stops when a trainable parameter gets none.
        """
        return rf"model\.{self.vision_tower}\." + self.vision_layer.format(layers="|".join(map(str, range(layers))))


FAMILIES = (
    # every llava-hf v1.6 checkpoint (mistral-7b, vicuna-7b/13b, llama3-llava-next-8b, 34b): CLIP 336 px, the anyres
    # grid; each trains in the form its own chat template allows (modeling.trl_training_template)
    Family("LLaVA-NeXT", "llava_next", "clip_vision_model", ("anyres", "tile", "base"), 1),
    # llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP 384 px, 729 tokens a view (no CLS, one layout), Qwen's ChatML
    Family("LLaVA with another LLM (SigLIP tower)", "llava", "siglip_vision_model", ("base",), 0),
    # llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf: SigLIP 384 px; several views: each its 27x27 base tile and a
    # newline (730 tokens); one view: tiled up to anyres_max_9 by the model itself ("base" is the checkpoint's own
    # layout)
    Family("LLaVA-OneVision", "llava_onevision", "siglip_vision_model", ("base",), 0, view_newline=True,
           video_processor="LlavaOnevisionVideoProcessor"),
    # google/medgemma-4b-it (Gemma 3): SigLIP 896 px pooled to 16x16 = 256 soft tokens a view between
    # <start_of_image> and <end_of_image>; its projector has no Linear layer
    Family("Gemma 3 (MedGemma)", "gemma3", "siglip_vision_model", ("base",), 0),
    # Qwen/Qwen2.5-VL-3B-Instruct: its own tower at a dynamic resolution (a view's tokens: its resized grid of 14 px
    # patches over 4, each 2x2 merged); tower and projector under `model.visual`
    Family("Qwen2.5-VL", "qwen2_5_vl", "qwen2_5_vl_vision", ("base",), 0, vision_tower="visual",
           projector="visual.merger", vision_layer=r"blocks\.({layers})\.attn\.(qkv|proj)",
           video_processor="Qwen2VLVideoProcessor"),
)


def family_of(config) -> Family:
    """The family of a checkpoint's config, or an OptionError naming the supported ones."""
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    for family in FAMILIES:
        if (config.model_type, vision) == (family.model_type, family.vision_type):
            return family
    supported = "; ".join(f"{f.name} (model type {f.model_type!r}, vision tower {f.vision_type!r})" for f in FAMILIES)
    raise OptionError(f"{getattr(config, 'name_or_path', '') or 'model'}: model type {config.model_type!r} with "
                      f"vision tower {vision!r} is not a supported family; supported: {supported}")


def end_of_turn(processor) -> str:
    """What the processor's chat template writes after an assistant turn's text (ChatML: "<|im_end|>\\n"), found by
    rendering a turn around a marker: the completion a prompt-completion row trains on ends with it.

    A template that ends the turn with whitespace alone (llava-hf's vicuna: a space before the next "USER:") leaves
    the stop to the model: its EOS, which LLaVA's vicuna conversations end a reply with and generation stops at."""
    turns = [{"role": role, "content": [{"type": "text", "text": text}]}  # a user turn first: Gemma's template
             for role, text in (("user", "a"), ("assistant", _MARKER))]  # refuses a conversation without one
    rendered = processor.apply_chat_template(turns, tokenize=False)
    if rendered.count(_MARKER) != 1:
        raise ValueError(f"chat template: an assistant turn's text is rendered {rendered.count(_MARKER)} times, "
                         f"not once: its end of turn cannot be read")
    end = rendered.split(_MARKER)[1]
    return end if end.strip() else processor.tokenizer.eos_token
