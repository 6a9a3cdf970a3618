"""Tiny random-weight replicas of the model families beyond LLaVA and LLaVA-NeXT (`families.FAMILIES`), built
offline with each family's real classes, processor and chat-template style, saved like a hub checkpoint
(`tiny_models.save_once`) so the tests run the project's real path on them. What they write is meaningless."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                          Gemma3TextConfig, LlamaConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2Config,
                          Qwen2VLImageProcessorPil, SiglipVisionConfig)
# TRL's copies of the templates google/gemma-3-* and Qwen/Qwen2.5-VL-*-Instruct ship
from trl.chat_template_utils import gemma3_chat_template, qwen2_5_vl_chat_template

from ..model.families import family_of
from ..model.modeling import video_stand_in
from .tiny_models import (MISTRAL_TOKENS, TINY_IMAGE_SIZE, TINY_LLAVA, build_random_llava, save_once,
                          train_byte_level_tokenizer, train_tokenizer)

# llava-hf's other v1.6 checkpoints' chat templates, written from their documented prompt formats (the hub texts
# could not be read offline): each view's "<image>\n" first, then the text.
# llava-v1.6-vicuna-7b/13b-hf: "USER: <image>\n... ASSISTANT:", a turn's text followed by a space, the assistant's
# inside generation markers (llava-hf added them), so TRL 1.16 leaves it as it is
VICUNA = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# llama3-llava-next-8b-hf: Llama 3's headers, a turn closed by <|eot_id|>
LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# llava-v1.6-34b-hf (Yi): ChatML, <|im_end|> with no newline after it
CHATML_34B = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# checkpoint: (special tokens, further specials, chat template). Vicuna's are Llama 2's (as Mistral's); the
# replicas' tokenizers all prepend their BOS (whether the 34b's prepends <|startoftext|> could not be checked)
LLAVA_NEXT_CHATS = {
    "vicuna": (MISTRAL_TOKENS, (), VICUNA),
    "llama3": ({"unk_token": "<unk>", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "pad_token": "<pad>"}, ("<|start_header_id|>", "<|end_header_id|>"), LLAMA3),
    "34b": ({"unk_token": "<unk>", "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<pad>"},
            ("<|im_start|>",), CHATML_34B),
}


def build_random_llava_next(out_dir: str | Path, texts: list[str], checkpoint: str, **kwargs) -> Path:
    """`tiny_models.build_random_llava` with a Llama LLM and the tokens and chat template of llava-hf's `checkpoint`
    (`LLAVA_NEXT_CHATS`: vicuna, llama3, 34b)."""
    tokens, specials, template = LLAVA_NEXT_CHATS[checkpoint]
    return build_random_llava(out_dir, texts, text_config=LlamaConfig, tokens=tokens, specials=specials,
                              chat_template=template, **kwargs)

# LLaVA-OneVision's ChatML as the llava-hf checkpoints are documented to write it (the hub text could not be read
# offline): role and a space, each view's <image> abutting, then "\n" and the text, <|im_end|> with no newline; the
# generation prompt "<|im_start|>assistant\n" (an assistant turn renders "assistant \n": the two differ, so the
# family trains on the generation prompt string, examples.training_text)
CHATML_ONEVISION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ '\\n' + part['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _vision(image_size: int, widths: dict) -> SiglipVisionConfig:
    return SiglipVisionConfig(**{k: v for k, v in widths["vision"].items() if k != "projection_dim"},
                              image_size=image_size, patch_size=14)


def build_random_llava_onevision(out_dir: str | Path, texts: list[str], *, image_size: int = TINY_IMAGE_SIZE,
                                 widths: dict = TINY_LLAVA, vocab_size: int = 640, seed: int = 0,
                                 device: str = "cpu", dtype=torch.float32) -> Path:
    """A random-weight LLaVA-OneVision laid out like llava-hf/llava-onevision-qwen2-0.5b-ov-hf: a SigLIP tower at
    `image_size` (its last layer, no CLS), a Qwen2 LLM, the pinpoints 1x1 to 6x6 tiles and anyres_max_9, Qwen's
    ChatML in OneVision's form. Its video processor is `modeling.ImageOnlyVideoProcessor`, saved under the
    checkpoint's own class name with default settings."""
    def build():
        tokenizer = train_byte_level_tokenizer(texts, vocab_size, {"video_token": "<video>"})
        text = Qwen2Config(**{"vocab_size": len(tokenizer), **widths["text"]}, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        pinpoints = [[image_size * i, image_size * j] for i in range(1, 7) for j in range(1, 7)]
        config = LlavaOnevisionConfig(
            vision_config=_vision(image_size, widths), text_config=text, image_grid_pinpoints=pinpoints,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                            image_grid_pinpoints=pinpoints),
            tokenizer=tokenizer, video_processor=video_stand_in(
                {"video_processor_type": family_of(config).video_processor}), chat_template=CHATML_ONEVISION,
            num_image_tokens=(image_size // 14) ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9")

    return save_once(out_dir, build, seed, device)



GEMMA_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
GEMMA_IMAGE_TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}


def build_random_gemma3(out_dir: str | Path, texts: list[str], *, image_size: int = TINY_IMAGE_SIZE,
                        tokens_per_view: int = 4, widths: dict = TINY_LLAVA, vocab_size: int = 640, seed: int = 0,
                        device: str = "cpu", dtype=torch.float32) -> Path:
    """A random-weight Gemma 3 laid out like google/medgemma-4b-it: a SigLIP tower at `image_size` pooled to
    `tokens_per_view` soft tokens a view (a square grid; 256 = 16x16 on the real one), each view written as
    <start_of_image>, the soft tokens, <end_of_image>; Gemma's tokenizer style (<bos> prepended, turns closed by
    <end_of_turn>) and chat template. (image_size / 14)² must be a multiple of `tokens_per_view` (the pooling)."""
    def build():
        tokenizer = train_tokenizer(texts, vocab_size, GEMMA_TOKENS, GEMMA_IMAGE_TOKENS,
                                    ("<start_of_turn>", "<end_of_turn>"))
        text = Gemma3TextConfig(**{"vocab_size": len(tokenizer), **widths["text"]}, head_dim=32, sliding_window=64,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")])
        config = Gemma3Config(text_config=text, vision_config=_vision(image_size, widths),
                              mm_tokens_per_image=tokens_per_view, **{
                                  f"{name}_index": tokenizer.convert_tokens_to_ids(token)
                                  for name, token in GEMMA_IMAGE_TOKENS.items()})
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = text.eos_token_id
        return model, Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer, chat_template=gemma3_chat_template, image_seq_length=tokens_per_view)

    return save_once(out_dir, build, seed, device)


QWEN_VL_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
                  "vision_eos_token": "<|vision_end|>"}


def build_random_qwen2_5_vl(out_dir: str | Path, texts: list[str], *, max_side: int = 112, widths: dict = TINY_LLAVA,
                            vocab_size: int = 640, seed: int = 0, device: str = "cpu", dtype=torch.float32) -> Path:
    """A random-weight Qwen2.5-VL laid out like Qwen/Qwen2.5-VL-3B-Instruct: its own vision tower (14 px patches,
    2x2 merged, windowed attention but in the last block), a view resized to at most `max_side`² pixels in multiples
    of 28 (a dynamic token count: the real default allows 1,280 tokens a view), each view written as
    <|vision_start|>, its <|image_pad|> tokens, <|vision_end|>; Qwen's tokenizer style and TRL's template."""
    def build():
        tokenizer = train_byte_level_tokenizer(texts, vocab_size, QWEN_VL_TOKENS)
        text = widths["text"]
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        config = Qwen2_5_VLConfig(
            text_config={**text, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                         "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,  # mrope's sections: head_dim / 2
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}},
            vision_config={"depth": widths["vision"]["num_hidden_layers"], "hidden_size": widths["vision"]["hidden_size"],
                           "intermediate_size": widths["vision"]["intermediate_size"],
                           "num_heads": widths["vision"]["num_attention_heads"], "out_hidden_size": text["hidden_size"],
                           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                           "fullatt_block_indexes": [widths["vision"]["num_hidden_layers"] - 1]},
            **{f"{name}_token_id": tokenizer.convert_tokens_to_ids(QWEN_VL_TOKENS[token]) for name, token in (
                ("image", "image_token"), ("video", "video_token"), ("vision_start", "vision_bos_token"),
                ("vision_end", "vision_eos_token"))})
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_side ** 2},
                                                   patch_size=14, merge_size=2, temporal_patch_size=2)
        return model, Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=qwen2_5_vl_chat_template,
            video_processor=video_stand_in({"video_processor_type": family_of(config).video_processor}))

    return save_once(out_dir, build, seed, device)
