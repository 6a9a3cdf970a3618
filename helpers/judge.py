"""The GREEN judge: green-score 0.0.12's own prompt, chat template, clean-up and scoring, run by a cached, batched loop.

green-score's `GREEN.__call__` cannot run on transformers 5 (`tokenizer.batch_encode_plus` is gone) and generates up to
2,048 tokens per pair without caching, so the judge model is run here; the prompt (`make_prompt`), the chat wrapping,
the decoding clean-up (`clean_responses`) and the scoring (`GREEN.compute_green`, `parse_error_counts`) are its own.
green_score is imported inside the functions that use it: the import takes about 7 s (it loads sentence-transformers;
measured on the CPU machine), and the demo model builders import this module without judging anything.
"""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import torch

from .lm import greedy_generate, left_padded, load_causal_lm
from .settings import GREEN_TOKEN_BUDGET as GREEN_MAX_LENGTH
from .storage import free_gpu_memory, open_store, run_sharded, sha256

DEFAULT_JUDGE = "StanfordAIMI/GREEN-RadLlama2-7b"
ERROR_CATEGORIES = ("a", "b", "c", "d", "e", "f")  # GREEN's clinically significant error types, in its order
# GREEN sets this template on its tokenizer inside GREEN.__init__ (a local variable there, not importable);
# a test checks that it equals what the shipped class sets.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['from'] == 'human' %}\n{{ '<|user|>\n' + message['value'] + "
    "eos_token }}\n{% elif message['from'] == 'system' %}\n{{ '<|system|>\n' + message['value'] + eos_token }}\n"
    "{% elif message['from'] == 'gpt' %}\n{{ '<|assistant|>\n'  + message['value'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@lru_cache(maxsize=1)
def green_scorer():
    """The shipped GREEN class without a model: its parser and score (`compute_summary_stats` off: no downloads)."""
    from green_score.green import GREEN

    return GREEN(model_name=None, cpu=True, compute_summary_stats=False)


def judge_messages(reference: str, candidate: str) -> list[dict]:
    """GREEN's conversation for one pair: its prompt (reference first) and the empty assistant turn it appends."""
    from green_score.utils import make_prompt

    return [{"from": "human", "value": make_prompt(reference, candidate)}, {"from": "gpt", "value": ""}]


def judge_key(judge_id: str, reference: str, candidate: str) -> str:
    return sha256(judge_id, reference, candidate)


def judge_dtype(dtype=None):
    """GREEN loads its judge in fp16: so does this on a GPU (fp32 on the CPU, where fp16 matmuls are slow)."""
    return dtype or (torch.float16 if torch.cuda.is_available() else torch.float32)


def judge_label(model_id: str, load_in_4bit: bool = False, dtype=None) -> str:
    """The judge as tables name it and the cache keys it: its id and precision, since a 4-bit or bf16 judge
    answers differently from GREEN's fp16 one."""
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[judge_dtype(dtype)]
    return f"{model_id} ({f'4-bit nf4, {precision} compute' if load_in_4bit else precision})"


def score_response(response: str) -> dict:
    """GREEN's score and error counts for one judge response.

    A response lacking GREEN's "[Clinically Significant Errors]" or "[Matched Findings]" section is unparseable:
    GREEN's own strict check (`for_reward=True`) returns None for it, while its `compute_green` would score it 0.
    Such pairs get green=None and are counted as failures, never averaged as 0.
    """
    green = green_scorer()
    parsed = all(green.parse_error_counts(response, category, for_reward=True)[0] is not None
                 for category in (green.categories[0], green.categories[2]))
    counts = green.compute_error_count(response)  # six significant error counts, then matched findings
    return {"green": green.compute_green(response) if parsed else None, "parsed": parsed,
            "errors": dict(zip(ERROR_CATEGORIES, counts[:6])), "matched": counts[6]}


def load_judge(model_id: str = DEFAULT_JUDGE, *, load_in_4bit: bool = False, dtype=None, token: str | None = None):
    """The judge model and a tokenizer set up exactly as GREEN.__init__ does (EOS appended, left padding, pad = EOS,
    its chat template), in GREEN's fp16 unless told otherwise (`judge_dtype`), or 4-bit with that compute dtype.
    """
    # GREEN's choices: remote code for every judge but Phi; the tokenizer always with remote code
    model, tokenizer = load_causal_lm(model_id, load_in_4bit=load_in_4bit, dtype=judge_dtype(dtype), token=token,
                                      model_kwargs={"trust_remote_code": "Phi" not in model_id},
                                      tokenizer_kwargs={"add_eos_token": True, "use_fast": True,
                                                        "trust_remote_code": True})
    left_padded(tokenizer, tokenizer.eos_token)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.clean_up_tokenization_spaces = True
    return model, tokenizer


def chat_text(tokenizer, reference: str, candidate: str) -> str:
    return tokenizer.apply_chat_template(judge_messages(reference, candidate), tokenize=False,
                                         add_generation_prompt=True)


def generate_responses(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy judge responses for one batch, decoded and cleaned as GREEN.get_response does.

    GREEN stops at 2,048 tokens in all (prompt + answer); `max_new_tokens` bounds the answer more tightly.
    """
    from green_score.utils import clean_responses

    sequences, prompt_length = greedy_generate(model, tokenizer, texts, max_new_tokens, max_length=GREEN_MAX_LENGTH,
                                               eos_token_id=tokenizer.eos_token_id)
    # GREEN decodes prompt + answer and cuts at the last "<|assistant|>" (clean_responses); so does this
    decoded = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    results = []
    for row, text in zip(sequences[:, prompt_length:].tolist(), decoded):
        ended = tokenizer.eos_token_id in row
        results.append({"response": clean_responses(text),
                        "n_new_tokens": row.index(tokenizer.eos_token_id) + 1 if ended else len(row),
                        "truncated": not ended})
    return results


class Judge:
    """GREEN judgments behind an append-only cache keyed by sha256(judge label, reference, candidate): the label
    (`judge_label`) names the precision too, so answers of a 4-bit judge never stand in for fp16 ones.

    The model loads only when some pair is not cached yet, so a finished evaluation reruns without a GPU.
    """
    def __init__(self, model_id: str, cache_path: str | Path, *, load_in_4bit: bool = False, dtype=None,
                 token: str | None = None, batch_size: int = 8, max_new_tokens: int = GREEN_MAX_LENGTH):
        self.model_id, self.load_in_4bit, self.dtype, self.token = model_id, load_in_4bit, judge_dtype(dtype), token
        self.label = judge_label(model_id, load_in_4bit, self.dtype)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.store = open_store(cache_path, key_field="key")
        self.model = self.tokenizer = None

    def release(self) -> None:
        """Drop the judge model (the cache stays readable): what loads next has the GPU to itself."""
        self.model = self.tokenizer = None
        free_gpu_memory()

    def judge(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """One cached record per (reference, candidate) pair, in order; identical pairs are judged once.

        Batches start at `batch_size` and halve on CUDA out-of-memory (the batch is redone, nothing lost). Under
        `torchrun` / `accelerate launch` the batches are spread over the processes (`storage.run_sharded`), each of
        which loads the judge on its own GPU.
        """
        keys = [judge_key(self.label, reference, candidate) for reference, candidate in pairs]
        unique = dict(zip(keys, pairs))
        todo = [key for key in unique if key not in self.store]
        print(f"judge {self.label}: {len(pairs)} pairs, {len(unique)} unique (dedupe saves "
              f"{len(pairs) - len(unique)} judge calls), {len(unique) - len(todo)} cached, {len(todo)} to judge")
        if todo:
            if self.model is None:
                self.model, self.tokenizer = load_judge(self.model_id, load_in_4bit=self.load_in_4bit,
                                                        dtype=self.dtype, token=self.token)
            texts = {key: chat_text(self.tokenizer, *unique[key]) for key in todo}
            lengths = {key: len(ids) for key, ids in zip(todo, self.tokenizer(list(texts.values()))["input_ids"])}
            # longest first: batches pad little, and an out-of-memory error shows in the first batch
            todo.sort(key=lambda key: -lengths[key])

            def judge_batch(batch):
                start = time.time()
                results = generate_responses(self.model, self.tokenizer, [texts[k] for k in batch], self.max_new_tokens)
                seconds = (time.time() - start) / len(batch)
                return [{"key": key, "judge": self.label, "reference": unique[key][0], "candidate": unique[key][1],
                         "max_new_tokens": self.max_new_tokens, "seconds": round(seconds, 3), **result}
                        for key, result in zip(batch, results)]

            self.store, run = run_sharded(self.store, todo, lambda key: key, judge_batch, batch_size=self.batch_size,
                                          desc="GREEN judge", unit="pair")
            self.batch_size = run["batch_size"]  # what fitted: the next call starts there
        return [self.store.get(key) for key in keys]
