"""Tiny random-weight stand-ins built offline (nothing downloaded): the demo's LLaVA-NeXT and GREEN judge.

They have the real architectures, chat templates and tokenizer styles, with tokenizers trained here on the report
text, and load from their folders exactly like hub checkpoints, so the demo and the tests run the real code paths.
What they write is meaningless.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor,
                          MistralConfig, PreTrainedTokenizerFast)
from trl.chat_template_utils import llava_next_chat_template  # the template llava-v1.6-mistral-7b-hf ships

from .judge import DEFAULT_JUDGE, GREEN_MAX_LENGTH, green_scorer
from .modeling import DEFAULT_MODEL_ID, HUB_PINPOINTS
from .reports import INSTRUCTION, format_report
from .settings import processes

BUILT_NOTE = "TINY_RANDOM_MODEL.json"
TINY_IMAGE_SIZE = 56  # tiny CLIP tile: 4x4 patches of 14 px
# Config widths of the stand-ins; helpers.gpu_check passes the real 7B ones. Multiples of 64, so bitsandbytes' 4-bit
# layers also run on the CPU. initializer_range 0.1, not 0.02: with tiny random weights the frozen lm_head would keep
# the logits near uniform, and LoRA could not even overfit two reports (tests/test_training.py checks that it can).
TINY_LLAVA = {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=64),
              "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=16384, initializer_range=0.1)}
# large weights: clear argmax margins, so fp16 greedy decoding is stable
TINY_JUDGE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=GREEN_MAX_LENGTH, initializer_range=0.5)


def tokenizer_corpus(studies) -> list[str]:
    """Text the tiny tokenizers are trained on: every report of `studies`, the targets' headers and the prompt."""
    texts = [INSTRUCTION, "[INST] [/INST]"]
    for study in studies:
        if study.regions:
            texts.append(format_report(study.regions))
        if study.original_report:
            texts.append(study.original_report)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer in the Llama/Mistral style (metaspace, <s> prepended), trained on `texts`."""
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


def _save_once(out_dir: str | Path, build, seed: int, device: str) -> Path:
    """Build (model, tokenizer or processor) with a fixed seed and save it, unless `out_dir` already holds one.

    The note is written last, so a build killed halfway is redone; with several processes the main one builds it.
    """
    out_dir = Path(out_dir)
    with processes().main_process_first():
        if not (out_dir / BUILT_NOTE).is_file():
            torch.manual_seed(seed)
            with torch.device(device):  # 7B weights are drawn straight on the GPU (helpers.gpu_check)
                model, preprocessor = build()
            model.save_pretrained(out_dir)
            preprocessor.save_pretrained(out_dir)
            (out_dir / BUILT_NOTE).write_text(json.dumps(
                {"note": "random weights, built offline by helpers.demo_models; outputs are meaningless",
                 "seed": seed, "class": type(model).__name__}, indent=2))
    return out_dir


def llava_id(settings, artifacts, studies, model_id: str | None = None) -> str:
    """`model_id`, else in the demo the tiny LLaVA-NeXT (built once in models/tiny-llava), else the default 7B."""
    if model_id:
        return str(model_id)
    if settings.offline:
        return str(build_random_llava(artifacts.models_dir / "tiny-llava", tokenizer_corpus(studies)))
    return DEFAULT_MODEL_ID


def judge_id(settings, artifacts, studies, model_id: str | None = None) -> str:
    """`model_id`, else in the demo the tiny judge (built once in models/tiny-green-judge), else GREEN-RadLlama2-7b."""
    if model_id:
        return str(model_id)
    if settings.offline:
        return str(build_random_judge(artifacts.models_dir / "tiny-green-judge", tokenizer_corpus(studies)))
    return DEFAULT_JUDGE


def build_random_llava(out_dir: str | Path, texts: list[str], *, image_size: int = TINY_IMAGE_SIZE,
                       widths: dict = TINY_LLAVA, vocab_size: int = 640, seed: int = 0, device: str = "cpu",
                       dtype=torch.float32) -> Path:
    """A random-weight LLaVA-NeXT with the real architecture and chat template, loadable like a hub id.

    Its grid is the hub checkpoint's five pinpoints scaled to `image_size` (336: the real geometry). Like the hub's,
    the saved processor leaves patch size, feature strategy and extra tokens to `modeling.fit_processor`. The
    tokenizer has `vocab_size` tokens; `widths["text"]` may give the model a larger vocabulary (the 7B's).
    """
    def build():
        tokenizer = train_tokenizer(texts, vocab_size)
        pinpoints = [[h * image_size // 336, w * image_size // 336] for h, w in HUB_PINPOINTS]
        vision = CLIPVisionConfig(**widths["vision"], image_size=image_size, patch_size=14)
        text = MistralConfig(**{"vocab_size": len(tokenizer), **widths["text"]}, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             sliding_window=None)
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                 image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 image_seq_length=(image_size // 14) ** 2)
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints, image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711])
        return model, LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=llava_next_chat_template)

    return _save_once(out_dir, build, seed, device)


def build_random_judge(out_dir: str | Path, texts: list[str], *, widths: dict = TINY_JUDGE, vocab_size: int = 420,
                       seed: int = 0, device: str = "cpu", dtype=torch.float32) -> Path:
    """A random-weight Llama judge with a Llama tokenizer (BPE + byte fallback, like GREEN-RadLlama2's).

    The tokenizer learns GREEN's prompt and answer format plus `texts`; a small vocabulary keeps the prompt long in
    tokens, so GREEN's fixed 2,048-token limit leaves few tokens to generate.
    """
    def build():
        from green_score.utils import make_prompt  # slow to import (see judge.py): only when a judge is built

        green = green_scorer()
        answer = "\n".join(["[Explanation]:", *(f"[{c}]:" for c in green.categories), *green.sub_categories,
                            "<|assistant|>"])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]  # Llama's byte-fallback tokens
        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        bpe.train_from_iterator([make_prompt("", ""), answer, *texts],
                                trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
        trained = json.loads(bpe.to_str())["model"]
        tokenizer = LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                                   add_bos_token=True)
        config = LlamaConfig(**{"vocab_size": len(tokenizer), **widths}, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        return LlamaForCausalLM._from_config(config, dtype=dtype), tokenizer

    return _save_once(out_dir, build, seed, device)
