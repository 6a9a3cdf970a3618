"""The GREEN judge's engines beside the static loop (judge.generate_responses): prompt token ids in, answers out.

- `ContinuousEngine`: transformers' continuous batching in process (paged KV cache, requests join and leave the
  running batch as they finish), each request with its own answer budget.
- `ServerEngine`: an OpenAI-compatible `/v1/completions` endpoint, requests sent concurrently with a bound, retried
  with backoff by the `openai` client (429, 5xx, timeouts, refused connections); what still fails is returned as a
  `Failed`, which the judge counts and never caches.

Both answer a list of prompts (token ids, as the judge's tokenizer builds them) with one dict or `Failed` each. An
answer carries the generated token ids where the engine returns them, else the server's decoded text.
"""
from __future__ import annotations

import copy
import math
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..core.errors import OptionError, UserError
from ..core.lm import GREEDY
from ..core.settings import GREEN_TOKEN_BUDGET
from ..core.storage import free_gpu_memory

# Pairs per call of an engine: each call's answers are cached at once, so a kill loses at most one call's pairs
CONTINUOUS_CHUNK = 256
REQUESTS_PER_WORKER = 4  # a server call sends this many requests per concurrent worker
# a prompt and its answer budget over the server's context, in vLLM's words (older, newer); other 400s stop the run
LENGTH_REFUSALS = ("longer than the maximum model length", "maximum context length")


@dataclass(frozen=True)
class Failed:
    """A pair the engine could not answer: why, in words (counted by the judge, never cached)."""
    reason: str


class JudgeServerError(UserError, RuntimeError):
    """The judge's server cannot be used at all (no answer at its URL, a rejected request, another tokenizer)."""


class JudgeDoesNotFit(UserError, MemoryError):
    """A GREEN sequence longer than the continuous engine's cache can hold on this GPU (the message says what to set)."""


# Batch tokens of the paged cache, the library's default first, halved while the chunk's longest sequence would not fit
# beside them: each one reserves activation memory (~56 KiB for the 7B judge) that the KV cache then lacks
BATCH_TOKENS = (8192, 4096, 2048, 1024, 512, 256)
SEED = 0  # the library seeds torch's generators (with a random seed when none is given); fork_rng restores the caller's


def flash_allowed() -> bool:
    """Flash attention 2 runs from compute capability 8.0 on: below it (a T4) the library must keep sdpa, and must not
    fetch a flash kernel from the Hub through `kernels`."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def cache_capacity(manager) -> int:
    """Tokens the paged cache that `manager` is about to build would hold, sized by the library's own code: its
    PagedAttentionCache built on the meta device (free memory read as for the real one, nothing allocated); 0 where no
    memory is left for a cache."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    model, config = manager.model, manager.continuous_batching_config
    logits_to_keep = getattr(model, "_supports_logits_to_keep", None)  # as the manager passes it
    try:
        cache = PagedAttentionCache(model.config.get_text_config(), config, torch.device("meta"),
                                    manager.distributed_helper, model.dtype,
                                    model_supports_logits_to_keep=callable(logits_to_keep) and logits_to_keep())
    except (MemoryError, ValueError):  # the library's refusals of a cache without room
        return 0
    return cache.num_blocks * config.page_size


class ContinuousEngine:
    """transformers' continuous batching on the judge (paged sdpa attention; flash attention where installed, from
    compute capability 8.0), decoding as the static loop does: the checkpoint's generation config, greedy (`GREEDY`).

    On a GPU the library sizes the paged cache from the free memory after the weights; its batch tokens are lowered
    until the chunk's longest sequence fits, and one that cannot fit even then is refused before any work
    (`fit_batch_tokens`). On the CPU, where the library would take most of the RAM and pay for attention masks over
    all of it, the cache holds the chunk's sequences exactly. An exception (Ctrl-C included) stops the generation
    thread after its current step, and each chunk's cache is freed when it ends, a failed chunk's too.
    """
    name = "continuous"

    def __init__(self, model, eos_token_id: int, pad_token_id: int):
        self.model = model  # the library switches its attention to a paged one while it runs, and back after
        self.generation_config = copy.deepcopy(model.generation_config)  # what generate() starts from
        self.generation_config.update(**GREEDY, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        # generate() applies these to static batches; the library drops the processors it does not support
        unlike = [type(p).__name__ for p in model._get_logits_processor(self.generation_config)]
        if (mode := self.generation_config.get_generation_mode()) != "greedy_search":
            unlike.insert(0, mode.value)
        if unlike:
            raise OptionError(f"{model.name_or_path}/generation_config.json asks for {', '.join(unlike)}: continuous "
                             f"batching would not decode as GREEN's loop does; use JUDGE_ENGINE='static'")
        self.chunk_size = CONTINUOUS_CHUNK

    def cache_config(self, prompts: list[list[int]], budgets: list[int]):
        from transformers import ContinuousBatchingConfig

        fixed = {"seed": SEED, "auto_switch_to_flash": flash_allowed()}
        if torch.cuda.is_available():
            return ContinuousBatchingConfig(**fixed)
        page = ContinuousBatchingConfig.page_size
        blocks = sum(math.ceil((len(p) + b) / page) for p, b in zip(prompts, budgets))
        return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=2048, **fixed)

    def fit_batch_tokens(self, manager, longest: int) -> None:
        """On a GPU, before `manager` builds its cache: the most batch tokens (`BATCH_TOKENS`) beside which the cache
        holds a `longest`-token sequence, or a MemoryError naming the sizes where none does."""
        if not torch.cuda.is_available():
            return  # cache_config sized the cache to the chunk
        for tokens in BATCH_TOKENS:
            manager.continuous_batching_config.max_batch_tokens = tokens
            if (capacity := cache_capacity(manager)) >= longest:
                return
        raise JudgeDoesNotFit(f"continuous judge engine: one GREEN sequence of {longest} tokens (prompt + answer budget) "
                          f"does not fit: with {torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB of GPU memory free "
                          f"beside the judge's weights, transformers' paged cache holds {capacity} tokens at most (at "
                          f"{tokens} batch tokens); use JUDGE_ENGINE='static' (its batches halve down to one pair) or "
                          f"JUDGE_4BIT=True to free memory")

    def answer(self, prompts: list[list[int]], budgets: list[int], texts=None) -> list[dict | Failed]:
        """Greedy answers, each request stopping at EOS or at its own budget; a request the library failed (out of
        cache, say) comes back as `Failed` with its error."""
        from transformers.generation.continuous_batching.utils import WorkloadHints

        hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(budgets),
                              num_requests=len(prompts))
        attention = self.model.config._attn_implementation
        gpus = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            manager = self.model.init_continuous_batching(generation_config=self.generation_config,
                                                          continuous_batching_config=self.cache_config(prompts, budgets),
                                                          workload_hints=hints)
            try:
                self.fit_batch_tokens(manager, max(len(p) + b for p, b in zip(prompts, budgets)))
                manager.warmup()
                manager.start()
                results = collect(manager, prompts, budgets)
            except BaseException:  # the library's context manager would first finish the chunk
                if manager.is_running():
                    manager.stop(block=True, hard_stop=True)  # stops after the current step
                raise
            else:
                manager.stop(block=True)
            finally:
                manager.destroy()
                # a thread that died keeps its error, whose traceback holds the thread's frames and with them the
                # manager and the paged cache: a cycle only a full collection frees (never, where a log handler keeps it)
                if (error := manager.background_thread_status.fatal_error) is not None:
                    traceback.clear_frames(error.__traceback__)
                if self.model.config._attn_implementation != attention:  # stop() restores it once the thread started
                    self.model.set_attn_implementation(attention)
                free_gpu_memory()
        answers = []
        for i in range(len(prompts)):
            result = results.get(f"pair-{i}")
            if result is None or result.error is not None:
                answers.append(Failed(f"continuous batching: {'no result' if result is None else result.error}"))
                continue
            tokens = result.generated_tokens
            ended = self.generation_config.eos_token_id in tokens
            answers.append({"token_ids": tokens, "n_new_tokens": len(tokens), "truncated": not ended})
        return answers


def collect(manager, prompts: list[list[int]], budgets: list[int]) -> dict:
    """The finished results of the requests `pair-<i>`, by id, until all are in or the generation thread died."""
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        manager.add_request(prompt, request_id=f"pair-{i}", max_new_tokens=budget)
    results = {}
    while len(results) < len(prompts):
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            results[result.request_id] = result
        elif result is None and not manager.is_running():
            break  # what it did not finish fails in answer()
    return results


def served_texts(tokenizer, prompts: list[list[int]]) -> list[str]:
    """The texts that `tokenizer` (the judge's own, as its files set it up: what a server loads) turns into exactly
    `prompts`: each prompt without the special tokens the tokenizer adds by itself, decoded with the others as their
    text (GREEN's appended EOS as "</s>"). Every text is checked before any is sent: a prompt no text gives is a
    JudgeServerError, before any judging."""
    added = tokenizer("")["input_ids"]  # what it puts around any text: BOS for a Llama-2 tokenizer
    texts = []
    for ids in prompts:
        head = next(n for n in range(len(added), -1, -1) if ids[:n] == added[:n])
        texts.append(tokenizer.decode(ids[head:len(ids) - len(added) + head], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False))
    for ids, back in zip(prompts, tokenizer(texts)["input_ids"]):
        if back != ids:
            first = next((i for i, (a, b) in enumerate(zip(ids, back)) if a != b), min(len(ids), len(back)))
            raise JudgeServerError(f"a judge prompt of {len(ids)} tokens has no text that the judge's own tokenizer "
                                   f"reads back as the same ids (they differ from token {first}): a server that "
                                   f"takes text would judge another prompt; use vLLM, which takes token ids")
    return texts


class ServerEngine:
    """Requests to an OpenAI-compatible server at `url` (with or without `/v1`), `concurrency` at a time.

    A vLLM server (it answers `/version`) gets the prompts as token ids and returns the prompts' and the answers' ids;
    any other gets `texts` (`served_texts`: what the judge's own tokenizer reads as the prompt's exact ids) and
    returns text. The first prompt goes first, for one token: a server that reads it as other ids (or, where it
    returns no ids, as another number of tokens) is refused before any judging. A prompt the server refuses for length
    is a `Failed` (counted); any other refused request stops the run. `api_key` (a lab server's) goes in the
    Authorization header only: never in an error, a label or a file.
    """
    name = "server"

    def __init__(self, url: str, *, concurrency: int = 16, timeout: float = 600, max_retries: int = 5,
                 api_key: str | None = None):
        import httpx
        import openai

        self.url, self.concurrency = url.rstrip("/").removesuffix("/v1"), concurrency
        self.chunk_size = concurrency * REQUESTS_PER_WORKER
        self.http = httpx.Client(timeout=10, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        self.flavor = self.preflight()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "EMPTY", timeout=timeout,
                                    max_retries=max_retries)
        self.stopped = None  # why the server stopped answering mid-run: later pairs fail at once
        self.checked = False  # whether a first prompt's tokens were checked (`answer`)

    def preflight(self) -> str:
        """"vLLM <version>" or "OpenAI-compatible server", or a JudgeServerError naming the URL before any work."""
        import httpx

        try:
            health = self.http.get(f"{self.url}/health")
            if health.status_code == 404:  # a server without /health: its model list answers instead
                health = self.http.get(f"{self.url}/v1/models")
            if health.status_code in (401, 403):
                raise self.key_refused(health.status_code)
            health.raise_for_status()
            version = self.http.get(f"{self.url}/version")
        except httpx.HTTPError as error:
            raise JudgeServerError(f"JUDGE_URL {self.url}: no OpenAI-compatible server answers there "
                                   f"({type(error).__name__}: {error}); start one (docs/scaling.md, 'Judge "
                                   f"servers') or fix JUDGE_URL") from None
        if version.status_code == 200 and "version" in version.json():
            return f"vLLM {version.json()['version']}"
        return "OpenAI-compatible server"

    def key_refused(self, status: int) -> JudgeServerError:
        return JudgeServerError(f"JUDGE_URL {self.url} refused the API key (HTTP {status}): set the server's key as "
                                f"JUDGE_API_KEY in Colab's secrets or the environment")

    @property
    def takes_token_ids(self) -> bool:
        return self.flavor.startswith("vLLM")

    def alive(self) -> bool:
        import httpx

        try:
            return self.http.get(f"{self.url}/health").status_code != 503
        except httpx.HTTPError:
            return False

    def ask(self, prompt_ids: list[int], text: str, budget: int) -> dict | Failed:
        import openai

        if self.stopped:
            return Failed(self.stopped)
        try:
            # no model named: the server's one model answers (transformers serve refuses any name but its own)
            completion = self.client.completions.create(
                model=openai.NOT_GIVEN, prompt=prompt_ids if self.takes_token_ids else text, max_tokens=budget,
                temperature=0, extra_body={"return_token_ids": True} if self.takes_token_ids else None)
        except openai.APIStatusError as error:
            if error.status_code == 400 and any(p in str(error).lower() for p in LENGTH_REFUSALS):
                return Failed(f"{self.url} refused a prompt for length (HTTP 400): its context is shorter than "
                              f"GREEN's prompt + answer (vLLM: --max-model-len {GREEN_TOKEN_BUDGET + 1})")
            if error.status_code in (401, 403):
                raise self.key_refused(error.status_code) from None
            if error.status_code in (400, 404, 422):  # a wrong request: every pair would fail alike
                raise JudgeServerError(f"JUDGE_URL {self.url} refused the request ({error.status_code}): "
                                       f"{error.message}") from None
            return Failed(f"{self.url}: HTTP {error.status_code} after retries")
        except openai.APIConnectionError as error:  # timeouts included
            if not self.alive():
                self.stopped = f"{self.url} stopped answering ({type(error).__name__})"
                return Failed(self.stopped)
            return Failed(f"{self.url}: {type(error).__name__} after retries")
        choice = completion.choices[0]
        served = getattr(choice, "prompt_token_ids", None)  # vLLM's return_token_ids
        if completion.usage.prompt_tokens != len(prompt_ids) or served not in (None, prompt_ids):
            raise JudgeServerError(
                f"JUDGE_URL {self.url} read a prompt as {completion.usage.prompt_tokens} tokens"
                f"{'' if served is None else ' (other ids)'} where the judge's tokenizer makes {len(prompt_ids)}: "
                f"it serves another tokenizer, or one set up otherwise; serve the judge's own folder "
                f"(`python -m python -m helpers.serve_judge`), or through vLLM")
        token_ids = getattr(choice, "token_ids", None)  # vLLM's return_token_ids
        answer = {"token_ids": token_ids} if token_ids is not None else {"text": choice.text}
        return {**answer, "n_new_tokens": completion.usage.completion_tokens,
                "truncated": choice.finish_reason == "length"}

    def answer(self, prompts: list[list[int]], budgets: list[int], texts: list[str]) -> list[dict | Failed]:
        if not self.checked and prompts:  # one token first: a server that reads the prompt otherwise stops here
            self.ask(prompts[0], texts[0], 1)
            self.checked = True
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.ask, prompts, texts, budgets))

    def close(self) -> None:
        self.client.close()
        self.http.close()
