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

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Pairs per call of an engine: each call's answers are cached at once, so a kill loses at most one call's pairs
CONTINUOUS_CHUNK = 256
REQUESTS_PER_WORKER = 4  # a server call sends this many requests per concurrent worker


@dataclass(frozen=True)
class Failed:
    """A pair the engine could not answer: why, in words (counted by the judge, never cached)."""
    reason: str


class JudgeServerError(RuntimeError):
    """The judge's server cannot be used at all (no answer at its URL, a rejected request, another tokenizer)."""


def kv_bytes_per_token(config, dtype) -> int:
    """Keys and values of every layer for one token: 2 · layers · kv_heads · head_dim · bytes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ContinuousEngine:
    """transformers' continuous batching on the judge (paged sdpa attention; flash attention where installed).

    On a GPU the library sizes the paged cache from the free memory after the weights (its `max_memory_percent`); a
    sequence that cannot fit even alone is refused before any work (`check_fits`). On the CPU, where the library would
    take most of the RAM and pay for attention masks over all of it, the cache holds the chunk's sequences exactly.
    """
    name = "continuous"

    def __init__(self, model, eos_token_id: int, pad_token_id: int):
        from transformers import GenerationConfig

        self.model = model  # the library switches its attention to a paged one while it runs, and back after
        self.generation_config = GenerationConfig(do_sample=False, eos_token_id=eos_token_id,
                                                  pad_token_id=pad_token_id)
        self.chunk_size = CONTINUOUS_CHUNK

    def cache_config(self, prompts: list[list[int]], budgets: list[int]):
        from transformers import ContinuousBatchingConfig

        if torch.cuda.is_available():
            return ContinuousBatchingConfig()
        page = ContinuousBatchingConfig.page_size
        blocks = sum(math.ceil((len(p) + b) / page) for p, b in zip(prompts, budgets))
        return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=2048)

    def check_fits(self, longest_sequence: int) -> None:
        """A clear error when one sequence's KV cache exceeds the GPU memory the library would give the cache."""
        if not torch.cuda.is_available():
            return
        free, _ = torch.cuda.mem_get_info()
        needed = kv_bytes_per_token(self.model.config, self.model.dtype) * longest_sequence
        if needed > 0.9 * free:  # the library's default share of the free memory
            raise MemoryError(f"continuous judge engine: one GREEN sequence of {longest_sequence} tokens needs "
                              f"{needed / 2**30:.2f} GiB of KV cache and {free / 2**30:.2f} GiB of GPU memory is free "
                              f"beside the judge's weights; use JUDGE_ENGINE='static' (its batches halve down to one "
                              f"pair) or JUDGE_4BIT=True to free memory")

    def answer(self, prompts: list[list[int]], budgets: list[int], texts=None) -> list[dict | Failed]:
        """Greedy answers, each request stopping at EOS or at its own budget; a request the library failed (out of
        cache, say) comes back as `Failed` with its error."""
        from transformers.generation.continuous_batching.utils import WorkloadHints

        self.check_fits(max(len(p) + b for p, b in zip(prompts, budgets)))
        hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(budgets),
                              num_requests=len(prompts))
        results = {}
        with self.model.continuous_batching_context_manager(
                generation_config=self.generation_config, continuous_batching_config=self.cache_config(prompts, budgets),
                workload_hints=hints, block=True, timeout=5) as manager:
            ids = [manager.add_request(p, request_id=f"pair-{i}", max_new_tokens=b)
                   for i, (p, b) in enumerate(zip(prompts, budgets))]
            while len(results) < len(ids):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                elif result is None and not manager.is_running():
                    break  # the generation thread died: what it did not finish fails below
        answers = []
        for request_id, budget in zip(ids, budgets):
            result = results.get(request_id)
            if result is None or result.error is not None:
                answers.append(Failed(f"continuous batching: {'no result' if result is None else result.error}"))
                continue
            tokens = result.generated_tokens
            ended = self.generation_config.eos_token_id in tokens
            answers.append({"token_ids": tokens, "n_new_tokens": len(tokens), "truncated": not ended})
        return answers


class ServerEngine:
    """Requests to an OpenAI-compatible server, `concurrency` at a time.

    A vLLM server (it answers `/version`) gets the prompts as token ids and returns the answers' token ids; any other
    gets the prompt text and returns text, and each answer's prompt token count is checked against ours, so a server
    that tokenizes otherwise (a BOS added, GREEN's appended EOS missing) is refused at its first answer.
    """
    name = "server"

    def __init__(self, url: str, *, concurrency: int = 16, timeout: float = 600, max_retries: int = 5,
                 api_key: str | None = None):
        import httpx
        import openai

        self.url, self.concurrency = url.rstrip("/"), concurrency
        self.chunk_size = concurrency * REQUESTS_PER_WORKER
        self.http = httpx.Client(timeout=10)
        self.flavor = self.preflight()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "EMPTY", timeout=timeout,
                                    max_retries=max_retries)
        self.stopped = None  # why the server stopped answering mid-run: later pairs fail at once

    def preflight(self) -> str:
        """"vLLM <version>" or "OpenAI-compatible server", or a JudgeServerError naming the URL before any work."""
        import httpx

        try:
            health = self.http.get(f"{self.url}/health")
            if health.status_code == 404:  # a server without /health: its model list answers instead
                health = self.http.get(f"{self.url}/v1/models")
            health.raise_for_status()
            version = self.http.get(f"{self.url}/version")
        except httpx.HTTPError as error:
            raise JudgeServerError(f"JUDGE_URL {self.url}: no OpenAI-compatible server answers there "
                                   f"({type(error).__name__}: {error}); start one (docs/scaling.md, 'Judge "
                                   f"servers') or fix JUDGE_URL") from None
        if version.status_code == 200 and "version" in version.json():
            return f"vLLM {version.json()['version']}"
        return "OpenAI-compatible server"

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
            if error.status_code in (400, 401, 403, 404, 422):  # a wrong request: every pair would fail alike
                raise JudgeServerError(f"JUDGE_URL {self.url} refused the request ({error.status_code}): "
                                       f"{error.message}") from None
            return Failed(f"{self.url}: HTTP {error.status_code} after retries")
        except openai.APIConnectionError as error:  # timeouts included
            if not self.alive():
                self.stopped = f"{self.url} stopped answering ({type(error).__name__})"
                return Failed(self.stopped)
            return Failed(f"{self.url}: {type(error).__name__} after retries")
        if completion.usage.prompt_tokens != len(prompt_ids):
            raise JudgeServerError(
                f"JUDGE_URL {self.url} read a prompt as {completion.usage.prompt_tokens} tokens where the judge's "
                f"tokenizer makes {len(prompt_ids)}: it tokenizes otherwise (BOS or GREEN's appended EOS); serve the "
                f"judge with `python -m helpers.serve_judge`, or through vLLM, which takes token ids")
        choice = completion.choices[0]
        token_ids = getattr(choice, "token_ids", None)  # vLLM's return_token_ids
        answer = {"token_ids": token_ids} if token_ids is not None else {"text": choice.text}
        return {**answer, "n_new_tokens": completion.usage.completion_tokens,
                "truncated": choice.finish_reason == "length"}

    def answer(self, prompts: list[list[int]], budgets: list[int], texts: list[str]) -> list[dict | Failed]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.ask, prompts, texts, budgets))

    def close(self) -> None:
        self.client.close()
        self.http.close()

