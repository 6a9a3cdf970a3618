"""`make gpu-check`'s judge parts: our judge loop against the shipped GREEN class (`judge`), and the judge's engines on
the same pairs (`engines`: static, continuous batching, `transformers serve`), on random-weight judges built
from the real Llama-2-7B shapes (the dry run: the demo's tiny widths)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from green_score.green import GREEN

from ..judge import engines, judge, servers
from ..core.data import REGIONS, Study
from ..demo.tiny_models import build_random_judge, tokenizer_corpus
from ..core.lm import greedy_generate
from ..core.settings import GREEN_TOKEN_BUDGET, REPO_ROOT, peak_gpu_memory_gb
from ..core.storage import free_gpu_memory


def random_weights() -> dict:
    """Random 7B weights are drawn on the GPU in fp16 (as the hub checkpoints are stored); tiny ones on the CPU."""
    return {"device": "cuda", "dtype": torch.float16} if torch.cuda.is_available() else {}


def free_and_reset():
    free_gpu_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def build_judge(workdir: Path, sizes: dict, sample: list[Study]) -> Path:
    """The demo's tiny judge widths (the dry run's judge) or a Llama-2-7B-shaped one with a tokenizer of its kind, with
    random weights: it never stops, so every answer runs to GREEN's budget."""
    widths = {} if sizes["judge"] is None else {"widths": sizes["judge"], **random_weights()}
    return build_random_judge(workdir / f"judge-{sizes['name']}", tokenizer_corpus(sample),
                              vocab_size=sizes["judge_tokenizer_vocab"], format_steps=0, **widths)



def judge_pairs(studies: list[Study], count: int) -> list[tuple[str, str]]:
    """The longest distinct (reference, candidate) pairs, formed as in notebook 04: one region's text in two studies."""
    by_region = [[s.regions[r] for s in studies if s.regions and s.regions[r]] for r in REGIONS]
    pairs = dict.fromkeys((ref, cand) for texts in by_region for ref, cand in zip(texts, texts[1:]) if ref != cand)
    return sorted(pairs, key=lambda pair: -len(pair[0]) - len(pair[1]))[:count]


def prompt_fields(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[str], dict]:
    """GREEN's chat prompts for `pairs` and their record fields: GREEN generates up to 2,048 tokens in all, prompt
    included (tests/test_green.py gives our loop the same bound), so the longest prompt sets the new tokens."""
    prompts = [judge.chat_text(tokenizer, ref, cand) for ref, cand in pairs]
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    return prompts, {"pairs": len(pairs), "prompt_tokens_max": longest,
                     "new_tokens_per_pair": GREEN_TOKEN_BUDGET - longest}


def shipped_green(judge_dir: str, pairs: list[tuple[str, str]]) -> dict:
    """The shipped GREEN class on one batch of `pairs`: its record fields, and its responses under "responses"."""
    free_and_reset()
    shipped = GREEN(judge_dir, cpu=not torch.cuda.is_available(), compute_summary_stats=False)
    shipped.tokenizer.batch_encode_plus = shipped.tokenizer.__call__  # removed in transformers 5 (tests/test_green.py)
    shipped.tokenizer.add_bos_token = True  # BOS and EOS, as under green-score's transformers 4.40 (judge.load_tokenizer)
    shipped.tokenizer.update_post_processor()
    prompts, fields = prompt_fields(shipped.tokenizer, pairs)
    judge.generate_responses(shipped.model, shipped.tokenizer, prompts[:1], 2)  # warm-up
    generate, new_tokens = shipped.model.generate, []

    def counted(**kwargs):  # GREEN reports no token counts: its batch's decoding steps, read off its own call
        sequences = generate(**kwargs)
        new_tokens.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return sequences

    shipped.model.generate = counted
    start = time.perf_counter()
    results = shipped([ref for ref, _ in pairs], [cand for _, cand in pairs])[-1]
    seconds = time.perf_counter() - start
    return {**fields, "generated_tokens_max": max(new_tokens), "seconds": seconds,
            "seconds_per_pair": seconds / len(pairs), "peak_memory_gib": peak_gpu_memory_gb(),
            "responses": list(results.green_analysis)}


def shipped_green_env(device_count: int, environ: dict) -> dict | None:
    """The environment of a child process for the shipped GREEN class, or None where it runs in this process.

    With more than one GPU visible GREEN.__init__ calls init_process_group("nccl"), which fails without torchrun's
    RANK and WORLD_SIZE. CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises, and this process has (measuring
    the parts before), so only a new process can be shown a single GPU: the first one this process sees, where it
    measured the rest. With one GPU the class runs here, leaving that GPU to one CUDA context."""
    if device_count < 2:
        return None
    first = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return {**environ, "CUDA_VISIBLE_DEVICES": first or "0"}


def shipped_green_in_child(env: dict, judge_dir: str, pairs: list[tuple[str, str]]) -> dict:
    """`shipped_green` in a child process with environment `env`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shipped.json"
        code = ("import json, sys; from helpers.preflight.gpu_check import shipped_green; "
                "open(sys.argv[2], 'w').write(json.dumps(shipped_green(*json.loads(sys.argv[1]))))")
        child = subprocess.run([sys.executable, "-c", code, json.dumps([judge_dir, pairs]), str(out)], cwd=REPO_ROOT,
                               env=env, stderr=subprocess.PIPE, text=True)
        if child.returncode:
            raise RuntimeError(f"the child process exited with {child.returncode}:\n{child.stderr[-3000:]}")
        return json.loads(out.read_text(encoding="utf-8"))



def answer_lengths(count: int, shortest: int, longest: int) -> list[int]:
    """`count` answer lengths spread evenly over [shortest, longest], interleaved so every batch mixes them."""
    step = (longest - shortest) / max(count - 1, 1)
    lengths = [round(shortest + i * step) for i in range(count)]
    return lengths[::2] + lengths[1::2]


def static_answers(model, tokenizer, texts: list[str], lengths: list[int], batch_size: int) -> list[list[int]]:
    """The static loop's cost on GREEN-like answers: each left-padded batch decodes until its longest answer ends;
    each pair's answer is its first `length` tokens."""
    answers = []
    for start in range(0, len(texts), batch_size):
        batch = slice(start, start + batch_size)
        sequences, prompt_length = greedy_generate(model, tokenizer, texts[batch], max(lengths[batch]),
                                                   max_length=GREEN_TOKEN_BUDGET, eos_token_id=tokenizer.eos_token_id)
        answers += [row[prompt_length:prompt_length + n] for row, n in zip(sequences.tolist(), lengths[batch])]
    return answers


def measure_engine(engine: str, fields: dict, judge_dir: str, pairs: list[tuple[str, str]], lengths: list[int],
                   workdir: Path, load, static_texts: dict) -> dict:
    """Pairs/s, answer tokens/s, peak memory and the share of answers identical to static's (decoded text) of one
    engine on `pairs`, each answer `lengths[i]` tokens long. `load()`: the in-process judge (model, tokenizer), kept
    between the static and continuous measurements; the server runs once the caller dropped it, alone on the GPU."""
    model, tokenizer = (None, judge.load_tokenizer(judge_dir)) if engine == "server" else load()
    texts = [judge.chat_text(tokenizer, ref, cand) for ref, cand in pairs]
    prompts = judge.prompt_ids(tokenizer, texts)
    lengths = [min(n, judge.answer_budget(len(p), n)) for p, n in zip(prompts, lengths)]
    server = None
    if engine == "static":
        static_answers(model, tokenizer, texts[:1], [2], 1)  # warm-up
        start = time.perf_counter()
        answers = static_answers(model, tokenizer, texts, lengths, fields["batch_size"])
        seconds = time.perf_counter() - start
    elif engine == "continuous":
        runner = engines.ContinuousEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        runner.answer(prompts[:1], [2])  # warm-up
        start = time.perf_counter()
        answers = [a["token_ids"] for a in runner.answer(prompts, lengths)]
        seconds = time.perf_counter() - start
    else:
        server = servers.transformers_serve(judge_dir, workdir / "served", dtype=fields["dtype"],
                                                 load_in_4bit=fields["load_in_4bit"])
        try:
            runner = engines.ServerEngine(server.url, concurrency=len(pairs))
            served = engines.served_texts(judge.shipped_tokenizer(judge_dir), prompts)
            start = time.perf_counter()
            answers = runner.answer(prompts, lengths, served)
            seconds = time.perf_counter() - start  # the server's shutdown below is not part of the measurement
            used = torch.cuda.mem_get_info() if torch.cuda.is_available() else None
            runner.close()
        finally:  # stopped on every path: the next measurement gets the GPU
            server.stop()
    if server is not None:
        failed = [a.reason for a in answers if isinstance(a, engines.Failed)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(answers)} server requests failed: {failed[0]}")
        decoded = [a["text"] for a in answers]
    else:
        decoded = tokenizer.batch_decode(answers, skip_special_tokens=True)
    if engine == "static":
        static_texts.clear()
        static_texts.update(zip(pairs, decoded))
    identical = [static_texts.get(pair) == text for pair, text in zip(pairs, decoded)] if static_texts else []
    return {"pairs": len(pairs), "answer_tokens": sum(lengths), "seconds": seconds, "pairs_per_s": len(pairs) / seconds,
            "answer_tokens_per_s": sum(lengths) / seconds,
            "peak_memory_gib": None if engine == "server" else peak_gpu_memory_gb(),
            "gpu_memory_used_gib": (used[1] - used[0]) / 2**30 if server is not None and used else None,
            "identical_to_static": sum(identical) / len(identical) if identical else None}
