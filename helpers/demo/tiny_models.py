"""Tiny random-weight stand-ins built offline (nothing downloaded): the demo's LLaVA-NeXT and GREEN judge
(RadEval's checkpoints: helpers.demo.radeval_stand_ins).

They have the real architectures, chat templates and tokenizer styles, with tokenizers trained here on the report
text, and load from their folders exactly like hub checkpoints, so the demo and the tests run the real code paths.
What they write is meaningless; the tiny judge is trained a few steps to write GREEN's answer format, so its answers
parse, but its counts are arbitrary.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, SiglipImageProcessorPil, SiglipVisionConfig)
from trl.chat_template_utils import llava_next_chat_template  # the template llava-v1.6-mistral-7b-hf ships

from ..judge.judge import CHAT_TEMPLATE, DEFAULT_JUDGE, GREEN_MAX_LENGTH, chat_text, green_scorer
from ..model.modeling import DEFAULT_MODEL_ID, HUB_PINPOINTS
from ..core.report_format import HEADERS, INSTRUCTION, format_report
from ..core.settings import processes

BUILT_NOTE = "TINY_RANDOM_MODEL.json"
# a new folder for the judge trained on GREEN's format: the cache keys answers by the judge's path, so an
# earlier random build's unparseable answers there are never reused
DEMO_JUDGE_DIR = "tiny-green-format-judge"
RANDOM_NOTE = "random weights, built offline by helpers.demo.tiny_models; outputs are meaningless"
JUDGE_NOTE = ("random weights, built offline by helpers.demo.tiny_models and trained a few steps to write GREEN's answer "
              "format; its counts are arbitrary, its scores meaningless")
TINY_IMAGE_SIZE = 56  # tiny CLIP tile: 4x4 patches of 14 px
# Config widths of the stand-ins; helpers.preflight.gpu_check passes the real 7B ones. Multiples of 64, so bitsandbytes' 4-bit
# layers also run on the CPU. initializer_range 0.1, not 0.02: with tiny random weights the frozen lm_head would keep
# the logits near uniform, and LoRA could not even overfit two reports (tests/test_training.py checks that it can).
TINY_LLAVA = {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=64),
              "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=16384, initializer_range=0.1)}
# large weights: clear argmax margins, so fp16 greedy decoding is stable
TINY_JUDGE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=GREEN_MAX_LENGTH, initializer_range=0.5)
# The tiny judge's answer: the shortest text GREEN's strict check (judge.score_response) parses with a real score
# (both sections; one error line, since GREEN = matched / (matched + significant errors)), in GREEN's layout. Each
# fixed phrase is one added token: an answer is at most 6 tokens with its EOS, far inside the demo's judge_max_new_tokens.
ANSWER_PHRASES = ("[Clinically Significant Errors]:\n(a) False report of a finding in the candidate: ",
                  ".\n\n[Matched Findings]:\n")
# ~0.2 s a step on 2 CPU cores at DEMO_JUDGE_VOCAB. Fewer steps or a higher learning rate: some seeds' judges stop
# mid-answer.
FORMAT_STEPS, FORMAT_BATCH, FORMAT_LR = 48, 8, 3e-3
DEMO_JUDGE_VOCAB = 1000  # GREEN's prompt in ~520 tokens: ~4x quicker to train on and to judge than at 420 (~1,250)


def tokenizer_corpus(studies) -> list[str]:
    """Text the tiny tokenizers are trained on: every report of `studies`, the targets' headers and the prompt."""
    texts = [INSTRUCTION, "[INST] [/INST]"]
    for study in studies:
        if study.regions:
            texts.append(format_report(study.regions))
        if study.original_report:
            texts.append(study.original_report)
    return texts


MISTRAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(texts: list[str], vocab_size: int, names: dict = MISTRAL_TOKENS, extra: dict | None = None,
                    specials: tuple = ()) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer in the Llama/Mistral style (metaspace, BOS prepended), trained on `texts`: its special
    tokens `names` (unk, bos, eos, pad), `extra` named ones ({"image_token": "<image>"} unless given) and `specials`."""
    extra = {"image_token": "<image>", **(extra or {})}
    tokenizer = Tokenizer(models.BPE(unk_token=names["unk_token"], fuse_unk=True, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    # "\n" is its own token, as in Mistral's vocabulary, so no token spans two report sections
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                       pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]{}/-_*#%&+=<>|\n▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=list(dict.fromkeys([*names.values(), *extra.values(), *specials])))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = names["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names, extra_special_tokens=extra,
                                   model_max_length=1_000_000)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# ChatML of the llava-interleave kind: each view's <image> first, abutting, then the text; the generation prompt is
# exactly the start of an assistant turn. The exact text of llava-interleave-qwen-0.5b-hf's template could not be
# checked offline.
CHATML_INTERLEAVE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% if message['content'] | selectattr('type', 'equalto', 'image') | list %}{{ '\\n' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_byte_level_tokenizer(texts: list[str], vocab_size: int, extra: dict | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE in Qwen's style (every byte a token, "Ġ" for a space, no BOS) with Qwen's specials
    and `extra` ones (name: token, e.g. {"video_token": "<video>"}), trained on `texts`."""
    extra = {"image_token": "<image>", **(extra or {})}
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(dict.fromkeys([*QWEN_SPECIALS, *extra.values()])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=extra, model_max_length=1_000_000)


def save_once(out_dir: str | Path, build, seed: int, device: str, note: str = RANDOM_NOTE) -> Path:
    """Build (model, tokenizer or processor) with a fixed seed and save it, unless `out_dir` already holds one.

    The note is written last, so a build killed halfway is redone; with several processes the main one builds it.
    """
    out_dir = Path(out_dir)
    with processes().main_process_first():
        if not (out_dir / BUILT_NOTE).is_file():
            torch.manual_seed(seed)
            with torch.device(device):  # 7B weights are drawn straight on the GPU (helpers.preflight.gpu_check)
                model, preprocessor = build()
            # 2 GB shards: safetensors copies a whole shard to CPU memory before writing it, and the default 50 GB
            # shard would hold all 15 GB of a 7B model at once (Colab has 12.7 GB of RAM)
            model.save_pretrained(out_dir, max_shard_size="2GB")
            preprocessor.save_pretrained(out_dir)
            (out_dir / BUILT_NOTE).write_text(json.dumps(
                {"note": note, "seed": seed, "class": type(model).__name__}, indent=2))
    return out_dir


def llava_id(settings, artifacts, studies, model_id: str | None = None) -> str:
    """`model_id`, else in the demo the tiny LLaVA-NeXT (built once in models/tiny-llava), else the default 7B."""
    if model_id:
        return str(model_id)
    if settings.offline:
        return str(build_random_llava(artifacts.models_dir / "tiny-llava", tokenizer_corpus(studies)))
    return DEFAULT_MODEL_ID


def judge_id(settings, artifacts, studies, model_id: str | None = None) -> str:
    """`model_id`, else in the demo the tiny judge that writes GREEN's format (built once in models/DEMO_JUDGE_DIR),
    else GREEN-RadLlama2-7b."""
    if model_id:
        return str(model_id)
    if settings.offline:
        return str(build_random_judge(artifacts.models_dir / DEMO_JUDGE_DIR, tokenizer_corpus(studies)))
    return DEFAULT_JUDGE


def build_random_llava(out_dir: str | Path, texts: list[str], *, image_size: int = TINY_IMAGE_SIZE,
                       widths: dict = TINY_LLAVA, vocab_size: int = 640, seed: int = 0, device: str = "cpu",
                       dtype=torch.float32, text_config=MistralConfig, tokens: dict = MISTRAL_TOKENS,
                       specials: tuple = (), chat_template: str = llava_next_chat_template) -> Path:
    """A random-weight LLaVA-NeXT with the real architecture and chat template, loadable like a hub id.

    Its grid is the hub checkpoint's five pinpoints scaled to `image_size` (336: the real geometry). Like the hub's,
    the saved processor leaves patch size, feature strategy and extra tokens to `modeling.fit_processor`. The
    tokenizer has `vocab_size` tokens; `widths["text"]` may give the model a larger vocabulary (the 7B's). The
    defaults are llava-v1.6-mistral-7b's LLM, tokens and template; another v1.6 checkpoint's (a Llama LLM, its
    special `tokens` and `specials`, its `chat_template`): tiny_vlms.build_random_llava_next.
    """
    def build():
        tokenizer = train_tokenizer(texts, vocab_size, tokens, specials=specials)
        pinpoints = [[h * image_size // 336, w * image_size // 336] for h, w in HUB_PINPOINTS]
        vision = CLIPVisionConfig(**widths["vision"], image_size=image_size, patch_size=14)
        text = text_config(**{"vocab_size": len(tokenizer), **widths["text"]}, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           **({"sliding_window": None} if text_config is MistralConfig else {}))
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
                                         chat_template=chat_template)

    return save_once(out_dir, build, seed, device)


def build_random_llava_qwen(out_dir: str | Path, texts: list[str], *, image_size: int = TINY_IMAGE_SIZE,
                            widths: dict = TINY_LLAVA, vocab_size: int = 640, seed: int = 0, device: str = "cpu",
                            dtype=torch.float32) -> Path:
    """A random-weight LLaVA with a Qwen2 LLM inside, laid out like llava-hf/llava-interleave-qwen-0.5b-hf (a SigLIP
    tower at `image_size`, its last layer's patches, no CLS: (image_size / 14)² tokens a view; Qwen's ChatML), with
    the real classes, loadable like a hub id. The saved processor leaves patch size and feature strategy to
    `modeling.fit_processor`, as `build_random_llava`'s does."""
    def build():
        tokenizer = train_byte_level_tokenizer(texts, vocab_size)
        vision = SiglipVisionConfig(**{k: v for k, v in widths["vision"].items() if k != "projection_dim"},
                                    image_size=image_size, patch_size=14)
        text = Qwen2Config(**{"vocab_size": len(tokenizer), **widths["text"]}, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        config = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                             vision_feature_select_strategy="full", image_seq_length=(image_size // 14) ** 2)
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
        return model, LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=CHATML_INTERLEAVE)

    return save_once(out_dir, build, seed, device)


def build_random_judge(out_dir: str | Path, texts: list[str], *, widths: dict = TINY_JUDGE,
                       vocab_size: int = DEMO_JUDGE_VOCAB, format_steps: int = FORMAT_STEPS, seed: int = 0,
                       device: str = "cpu", dtype=torch.float32) -> Path:
    """A random-weight Llama judge with a Llama tokenizer (BPE + byte fallback, like GREEN-RadLlama2's), then trained
    `format_steps` steps to answer in GREEN's format (`teach_answer_format`; tuned to the demo's widths and
    vocabulary).

    The tokenizer learns GREEN's prompt and answer format plus `texts`; DEMO_JUDGE_VOCAB tokens make GREEN's prompt
    ~520 tokens. `format_steps=0` leaves the weights random: a judge that never stops, for gpu_check's timings and the
    faithfulness test, which run at GREEN's full 2,048-token budget.
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
        tokenizer.add_tokens(list(ANSWER_PHRASES))  # none occurs in GREEN's prompt: its tokens stay BPE's
        config = LlamaConfig(**{"vocab_size": len(tokenizer), **widths}, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
        if format_steps:
            teach_answer_format(model, tokenizer, judge_training_pairs(texts, format_steps * FORMAT_BATCH, seed))
        return model, tokenizer

    return save_once(out_dir, build, seed, device, JUDGE_NOTE if format_steps else RANDOM_NOTE)


def green_answer(errors: int, matched: int) -> str:
    return f"{ANSWER_PHRASES[0]}{errors}{ANSWER_PHRASES[1]}{matched}."


def format_counts(reference: str, candidate: str) -> tuple[int, int]:
    """(errors, matched) of a pair, from its length in words: meaningless, but a feature the tiny judge picks up from
    its input in a few steps, so its greedy answers differ between pairs (GREEN 1, 2/3 or 3/4); counts drawn from a
    hash cannot be learnt, and the judge answers their majority everywhere. Errors 0 or 1, matched 2 or 3: each
    digit says which token follows it (the matched section or the final "."); with shared digits the judge often
    stopped after the first count."""
    words = len(f"{reference} {candidate}".split())
    return int(words > 12), 2 + int(words > 25)  # about a third of the sample's pairs each: short, middle, long


def judge_training_pairs(texts: list[str], count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (reference, candidate) pairs drawn from `texts`: each text's region sentences (its lines without the
    "Lung: " headers) and the text whole, the regions joined as the Judge sees a whole report; one in eight empty."""
    headers = re.compile(rf"^(?:{'|'.join(HEADERS.values())}):\s*")
    pieces = []
    for text in texts:
        lines = [headers.sub("", line).strip() for line in text.splitlines()]
        pieces += [line for line in lines if line] + [" ".join(line for line in lines if line)]
    rng = random.Random(seed)

    def draw() -> str:
        return "" if rng.random() < 1 / 8 else rng.choice(pieces)

    return [(draw(), draw()) for _ in range(count)]


def teach_answer_format(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = FORMAT_BATCH,
                        lr: float = FORMAT_LR) -> None:
    """Train `model` on `pairs` (one pass, `batch_size` a step) to answer GREEN's prompt with `green_answer` of
    `format_counts` and EOS: the loss on the answer only, prompts rendered as `judge.Judge` renders them."""
    tokenizer.chat_template = CHAT_TEMPLATE  # as load_judge sets it (GREEN's), so chat_text renders GREEN's text
    examples = [answer_example(tokenizer, reference, candidate) for reference, candidate in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for start in range(0, len(examples), batch_size):
        model(**padded_batch(examples[start:start + batch_size], tokenizer.eos_token_id)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def answer_example(tokenizer, reference: str, candidate: str) -> tuple[list[int], int]:
    """(prompt + answer token ids, where the answer starts). The prompt ends in EOS, as load_judge's tokenizer
    (GREEN's `add_eos_token=True`) gives it to the judge; the answer ends in EOS, where generation stops."""
    prompt = tokenizer(chat_text(tokenizer, reference, candidate))["input_ids"] + [tokenizer.eos_token_id]
    answer = tokenizer(green_answer(*format_counts(reference, candidate)), add_special_tokens=False)["input_ids"]
    return prompt + answer + [tokenizer.eos_token_id], len(prompt)


def padded_batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Right-padded ids, attention mask and labels (-100 but on the answers): positions count from each row's start,
    as generation's left padding gives them."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, answer_start) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, answer_start:len(ids)] = input_ids[row, answer_start:len(ids)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
