"""Loading any of the project's models (4-bit or 16-bit, straight onto the GPU) and batched greedy decoding of
causal LMs, shared by the hf region splitter and the GREEN judge."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .settings import default_dtype, processes

# Vision tower, projector and lm_head stay in 16 bits under 4-bit. transformers 5 matches `llm_int8_skip_modules`
# against the start of the module path, so bare names ("vision_tower") are ignored. Qwen2.5-VL's tower and projector
# sit under "model.visual" (a 4-bit projector could not be trained in full: PEFT fails on its integer weights).
SKIP_QUANTIZATION = ["model.vision_tower", "model.multi_modal_projector", "model.visual", "lm_head"]
# Greedy decoding over whatever sampling the checkpoint's generation_config.json sets: what GREEN passes to generate(),
# and the GREEN judge's continuous engine too (judge_engines)
GREEDY = {"do_sample": False, "temperature": None, "top_p": None}


def bnb_4bit_config(compute_dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=SKIP_QUANTIZATION)


def load_weights(auto_class, model_id: str, *, load_in_4bit: bool = False, dtype=None, token: str | None = None,
                 **kwargs):
    """`auto_class.from_pretrained` in 4-bit (nf4, see bnb_4bit_config) or in `dtype`, straight onto the GPU when
    there is one (device_map: shards go to the GPU as they are read, the model is never whole in CPU memory)."""
    dtype = dtype or default_dtype()
    kwargs = {"dtype": dtype, "token": token, "device_map": process_device_map(), **kwargs}
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(dtype)
    return auto_class.from_pretrained(model_id, **kwargs)


def process_device_map() -> dict:
    """The whole model on this process's own GPU (GPU i for the i-th process on a machine under torchrun or
    accelerate launch, as TRL's QLoRA multi-GPU recipe places it), or on the CPU."""
    return {"": processes().local_process_index if torch.cuda.is_available() else "cpu"}


def left_padded(tokenizer, pad_token: str | None = None):
    """Batched generation continues every row from its last real token, so prompts are padded on the left."""
    tokenizer.padding_side = "left"
    if pad_token is not None or tokenizer.pad_token is None:
        tokenizer.pad_token = pad_token or tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_id: str, *, load_in_4bit: bool = False, dtype=None, token: str | None = None,
                   model_kwargs: dict | None = None, tokenizer_kwargs: dict | None = None):
    """A causal LM in eval mode and its left-padded tokenizer."""
    model = load_weights(AutoModelForCausalLM, model_id, load_in_4bit=load_in_4bit, dtype=dtype, token=token,
                         **(model_kwargs or {})).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_id, token=token, **(tokenizer_kwargs or {}))
    return model, left_padded(tokenizer)


def greedy_generate(model, tokenizer, texts: list[str], max_new_tokens: int, *, max_length: int | None = None,
                    add_special_tokens: bool = True, eos_token_id=None):
    """Greedy continuations of left-padded prompts: (sequences with the prompts, prompt length in tokens).

    `max_length` truncates the prompts and caps prompt + answer (GREEN's fixed 2,048-token budget);
    `eos_token_id` None: the model's generation config decides.
    """
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens,
                      truncation=max_length is not None, max_length=max_length).to(model.device)
    prompt_length = batch["input_ids"].shape[1]
    if max_length is not None:  # a prompt that fills the budget still gets one token: an unparseable, counted answer
        max_new_tokens = max(1, min(max_new_tokens, max_length - prompt_length))
    stop = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with torch.inference_mode():
        sequences = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=max_new_tokens, **GREEDY, pad_token_id=tokenizer.pad_token_id, **stop)
    return sequences, prompt_length
