"""The GREEN judge: green-score 0.0.12's own prompt, chat template, clean-up and scoring, run by a cached, batched loop.

green-score's `GREEN.__call__` cannot run on transformers 5 (`tokenizer.batch_encode_plus` is gone) and generates up to
2,048 tokens per pair without caching, so the judge model is run here; the prompt (`make_prompt`), the chat wrapping,
the decoding clean-up (`clean_responses`) and the scoring (`GREEN.compute_green`, `parse_error_counts`) are its own.
green_score is imported inside the functions that use it: the import takes about 7 s (it loads sentence-transformers;
measured on the CPU machine), and the demo model builders import this module without judging anything.
"""
from __future__ import annotations

import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.errors import OptionError
from . import engines, servers
from .engines import Failed
from ..core.lm import greedy_generate, left_padded, load_weights
from ..core.settings import GREEN_TOKEN_BUDGET as GREEN_MAX_LENGTH, get_secret
from ..core.storage import free_gpu_memory, open_store, run_sharded, sha256

DEFAULT_JUDGE = "StanfordAIMI/GREEN-RadLlama2-7b"
ENGINES = ("static", "continuous", "server")
# continuous batching: faster; on the CPU the static loop's answers in every profile's numerics
# (tests/test_judge_engines.py), on a GPU not always (judge_label), so its answers are cached apart
DEFAULT_ENGINE = "continuous"
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


# Version 2: prompts begin with BOS, as GREEN's tokenizer makes them (`load_tokenizer`); under transformers 5 they
# lacked it before, so answers cached under version 1 are judged again rather than reused
CACHE_VERSION = "2"


def judge_key(judge_id: str, reference: str, candidate: str) -> str:
    return sha256(CACHE_VERSION, judge_id, reference, candidate)


def judge_dtype(dtype=None):
    """GREEN loads its judge in fp16: so does this on a GPU (fp32 on the CPU, where fp16 matmuls are slow)."""
    return dtype or (torch.float16 if torch.cuda.is_available() else torch.float32)


def judge_label(model_id: str, load_in_4bit: bool = False, dtype=None, engine: str = "static",
                served_by: str | None = None) -> str:
    """The judge as tables name it and the cache keys it: its id and precision, since a 4-bit or bf16 judge answers
    differently from GREEN's fp16 one, and the engine unless it is GREEN's own loop ("static"): "continuous
    batching", or a server's software (`served_by`). On a GPU their answers may differ from static's (bitsandbytes picks
    other kernels for other row counts; continuous batching packs requests and shares prefix blocks; a server has its
    own kernels): `make gpu-check` reports the share identical to static."""
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[judge_dtype(dtype)]
    precision = f"4-bit nf4, {precision} compute" if load_in_4bit else precision
    runner = {"static": None, "continuous": "continuous batching", "server": served_by}[engine]
    return f"{model_id} ({precision}{f', {runner}' if runner else ''})"


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


def shipped_tokenizer(model_id: str, token: str | None = None):
    """The judge's tokenizer as its files set it up, without GREEN's changes: what a server loads."""
    return AutoTokenizer.from_pretrained(model_id, token=token, use_fast=True, trust_remote_code=True)


def load_tokenizer(model_id: str, token: str | None = None):
    """The judge's tokenizer set up exactly as GREEN.__init__ does: EOS appended, left padding, pad = EOS, its chat
    template (GREEN loads it with remote code, fast). BOS stays as the files have it (a Llama-2 tokenizer's first
    token): transformers 5 rebuilds the tokenizer's post-processor when `add_eos_token` is given and would drop BOS
    unless `add_bos_token` is given too; transformers 4, where GREEN was written, kept it."""
    shipped = shipped_tokenizer(model_id, token)
    adds_bos = shipped.bos_token_id is not None and shipped("")["input_ids"][:1] == [shipped.bos_token_id]
    tokenizer = AutoTokenizer.from_pretrained(model_id, token=token, add_eos_token=True, add_bos_token=adds_bos,
                                              use_fast=True, trust_remote_code=True)
    left_padded(tokenizer, tokenizer.eos_token)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.clean_up_tokenization_spaces = True
    return tokenizer


def load_judge(model_id: str = DEFAULT_JUDGE, *, load_in_4bit: bool = False, dtype=None, token: str | None = None):
    """The judge model and GREEN's tokenizer (`load_tokenizer`), in GREEN's fp16 unless told otherwise
    (`judge_dtype`), or 4-bit with that compute dtype; remote code for every judge but Phi, as GREEN loads them."""
    model = load_weights(AutoModelForCausalLM, model_id, load_in_4bit=load_in_4bit, dtype=judge_dtype(dtype),
                         token=token, trust_remote_code="Phi" not in model_id).eval()
    return model, load_tokenizer(model_id, token)


def chat_text(tokenizer, reference: str, candidate: str) -> str:
    return tokenizer.apply_chat_template(judge_messages(reference, candidate), tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The prompts' token ids as the static loop builds them: BOS and GREEN's appended EOS where its tokenizer puts
    them, cut at GREEN's 2,048 tokens."""
    return tokenizer(texts, truncation=True, max_length=GREEN_MAX_LENGTH)["input_ids"]


def answer_budget(prompt_length: int, max_new_tokens: int) -> int:
    """New tokens a prompt may get: GREEN's 2,048 in all, at most `max_new_tokens`, at least one (a prompt that fills
    the budget gets an unparseable, counted answer)."""
    return max(1, min(max_new_tokens, GREEN_MAX_LENGTH - prompt_length))


def generate_responses(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy judge responses for one left-padded batch (the static engine, GREEN's own way), decoded and cleaned
    as GREEN.get_response does.

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


def engine_response(tokenizer, prompt: list[int], answer: dict) -> dict:
    """An engine's answer as `generate_responses` gives it: prompt + answer decoded and cleaned as GREEN does; a
    server's text follows the decoded prompt (the cut at the last "<|assistant|>" leaves the answer)."""
    from green_score.utils import clean_responses

    if "token_ids" in answer:
        text = tokenizer.decode(prompt + answer["token_ids"], skip_special_tokens=True)
    else:
        text = tokenizer.decode(prompt, skip_special_tokens=True) + answer["text"]
    return {"response": clean_responses(text), "n_new_tokens": answer["n_new_tokens"], "truncated": answer["truncated"]}


class JudgeFailed(RuntimeError):
    """Pairs the engine could not judge after its retries: counted and named here, never cached, so a rerun judges
    only them."""


class Judge:
    """GREEN judgments behind an append-only cache keyed by sha256(judge label, reference, candidate): the label
    (`judge_label`) names the precision and the engine too, so answers of a 4-bit judge never stand in for fp16 ones,
    nor continuous batching's for static's.

    `engine`: "static" (GREEN's left-padded batches, the reference), "continuous" (transformers' continuous batching,
    the same weights) or "server" (an OpenAI-compatible server at `url`; without one, vLLM started on this GPU, or
    `transformers serve` on the CPU). The model or server starts only when some pair is not cached yet, so a finished
    evaluation reruns without a GPU (a `url` is still checked first: its software names the label).
    """
    def __init__(self, model_id: str, cache_path: str | Path, *, load_in_4bit: bool = False, dtype=None,
                 token: str | None = None, batch_size: int = 8, max_new_tokens: int = GREEN_MAX_LENGTH,
                 engine: str = "static", url: str | None = None, concurrency: int = 16):
        if engine not in ENGINES:
            raise OptionError(f"JUDGE_ENGINE {engine!r}: choose one of {ENGINES}")
        self.model_id, self.load_in_4bit, self.dtype, self.token = model_id, load_in_4bit, judge_dtype(dtype), token
        self.engine, self.url, self.concurrency = engine, url, concurrency
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.store = open_store(cache_path, key_field="key")
        self.model = self.tokenizer = self.shipped = self.runner = self.server = None
        served_by = None
        if engine == "server" and url:  # before any work: a URL that does not answer is refused here
            self.runner = engines.ServerEngine(url, concurrency=concurrency,
                                                     api_key=get_secret("JUDGE_API_KEY"))  # a lab server's key
            served_by = self.runner.flavor
        elif engine == "server":
            served_by = f"vLLM {servers.VLLM_VERSION}" if torch.cuda.is_available() else "transformers serve"
        # vLLM's bitsandbytes layers cast their inputs to bf16 whatever its --dtype (a T4 has no native bf16)
        compute = torch.bfloat16 if load_in_4bit and (served_by or "").startswith("vLLM") else self.dtype
        self.label = judge_label(model_id, load_in_4bit, compute, engine, served_by)

    def release(self) -> None:
        """Drop the judge model and stop a server this judge started (the cache stays readable): what loads next has
        the GPU to itself."""
        if self.server is not None:  # a server this judge started (a JUDGE_URL's is the user's, and stays)
            try:
                self.runner.close()
            finally:
                self.server.stop()
                self.server = self.runner = None
        if self.engine == "continuous":
            self.runner = None
        self.model = self.tokenizer = None
        free_gpu_memory()

    def load(self) -> None:
        """The tokenizer and what answers: the model in process, or the server (started here when there is no url)."""
        if self.engine != "server":
            if self.model is None:
                self.model, self.tokenizer = load_judge(self.model_id, load_in_4bit=self.load_in_4bit,
                                                        dtype=self.dtype, token=self.token)
            if self.engine == "continuous" and self.runner is None:
                self.runner = engines.ContinuousEngine(self.model, self.tokenizer.eos_token_id,
                                                             self.tokenizer.pad_token_id)
            return
        self.tokenizer = self.tokenizer or load_tokenizer(self.model_id, self.token)
        self.shipped = self.shipped or shipped_tokenizer(self.model_id, self.token)  # for a server that reads text
        if self.runner is None:
            workdir = self.store.path.parent / "judge_server"
            if torch.cuda.is_available():
                self.server = servers.vllm_serve(self.model_id, workdir, load_in_4bit=self.load_in_4bit,
                                                      token=self.token)
            else:
                self.server = servers.transformers_serve(self.model_id, workdir,
                                                              dtype=str(self.dtype).removeprefix("torch."),
                                                              load_in_4bit=self.load_in_4bit)
            self.runner = engines.ServerEngine(self.server.url, concurrency=self.concurrency)

    def judge(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """One cached record per (reference, candidate) pair, in order; identical pairs are judged once.

        Static batches start at `batch_size` and halve on CUDA out-of-memory (the batch is redone, nothing lost); the
        other engines take a chunk of pairs at a time and manage their own memory. Under `torchrun` /
        `accelerate launch` the batches are spread over the processes (`storage.run_sharded`), each with its own
        judge. Pairs an engine could not answer raise `JudgeFailed` at the end, after the others are cached.
        """
        keys = [judge_key(self.label, reference, candidate) for reference, candidate in pairs]
        unique = dict(zip(keys, pairs))
        todo = [key for key in unique if key not in self.store]
        print(f"judge {self.label}: {len(pairs)} pairs, {len(unique)} unique (dedupe saves "
              f"{len(pairs) - len(unique)} judge calls), {len(unique) - len(todo)} cached, {len(todo)} to judge "
              f"({self.engine} engine)")
        if not todo:
            return [self.store.get(key) for key in keys]
        self.load()
        texts = {key: chat_text(self.tokenizer, *unique[key]) for key in todo}
        prompts = dict(zip(todo, prompt_ids(self.tokenizer, list(texts.values()))))
        if self.engine == "server" and not self.runner.takes_token_ids:  # what the server's tokenizer reads as them
            texts = dict(zip(todo, engines.served_texts(self.shipped, [prompts[key] for key in todo])))
        # longest first: batches pad little, and an out-of-memory error shows in the first batch
        todo.sort(key=lambda key: -len(prompts[key]))
        failures = {}

        def judge_batch(batch):
            start = time.time()
            if self.engine == "static":
                answers = generate_responses(self.model, self.tokenizer, [texts[k] for k in batch], self.max_new_tokens)
            else:
                answers = self.runner.answer([prompts[k] for k in batch],
                                             [answer_budget(len(prompts[k]), self.max_new_tokens) for k in batch],
                                             [texts[k] for k in batch])
                answers = [a if isinstance(a, Failed) else engine_response(self.tokenizer, prompts[k], a)
                           for k, a in zip(batch, answers)]
            seconds = (time.time() - start) / len(batch)
            failures.update((k, a.reason) for k, a in zip(batch, answers) if isinstance(a, Failed))
            return [{"key": key, "judge": self.label, "reference": unique[key][0], "candidate": unique[key][1],
                     "max_new_tokens": self.max_new_tokens, "engine": self.engine, "seconds": round(seconds, 3),
                     **answer} for key, answer in zip(batch, answers) if not isinstance(answer, Failed)]

        self.store, run = run_sharded(self.store, todo, lambda key: key, judge_batch, unit="pair",
                                      batch_size=self.batch_size if self.engine == "static" else self.runner.chunk_size,
                                      desc=f"GREEN judge ({self.engine})")
        if self.engine == "static":
            self.batch_size = run["batch_size"]  # what fitted: the next call starts there
        if failures:
            reasons = Counter(failures.values())
            died = "" if self.server is None or self.server.process.poll() is None else (
                f"\nthe judge server died; last lines of {self.server.log_path}:\n{self.server.log_tail()}")
            raise JudgeFailed(f"GREEN judge: {len(failures)} of {len(todo)} pairs failed and were not cached ("
                              + "; ".join(f"{n} x {why}" for why, n in reasons.most_common()) + f"); the other "
                              f"{len(todo) - len(failures)} are cached in {self.store.path}: rerun to judge only the "
                              f"{len(failures)} missing{died}")
        return [self.store.get(key) for key in keys]
