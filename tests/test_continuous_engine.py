"""The continuous engine's life cycle on the demo judge (CPU): a failed chunk frees its paged cache, an exception while
results are awaited stops the generation thread at once, the caller's RNG is left as it was, the checkpoint's
generation config is applied as the static loop applies it, and on a GPU the cache is sized by the library's own code
(an oversized pair refused before any work) with flash attention only from compute capability 8.0.

There is no GPU here: the GPU tests mock `torch.cuda.is_available`, `mem_get_info` (the free memory the library sizes
its cache from), `synchronize` (the library's memory reading calls it) and `get_device_capability`, nothing else; the
model and the library's real cache then live on the CPU. Failures are injected where they would arise (CUDA's
out-of-memory error from the model's forward, Ctrl-C while the manager's results are awaited), and the caches the
library builds are observed by wrapping its constructor.
"""
import copy
import gc
import inspect
import threading
import weakref
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from transformers.generation.continuous_batching import cache as paged
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

from helpers.judge import engines, judge


@pytest.fixture(scope="module")
def loaded(green_judge_dir):
    return judge.load_judge(str(green_judge_dir))


@pytest.fixture(scope="module")
def texts(loaded, sample_studies):
    """GREEN's chat prompts for three distinct lung pairs of consecutive studies."""
    pairs = [(a.regions["lung"], b.regions["lung"]) for a, b in zip(sample_studies, sample_studies[1:])
             if a.regions and b.regions and a.regions["lung"] != b.regions["lung"]][:3]
    return [judge.chat_text(loaded[1], *pair) for pair in pairs]


@pytest.fixture(scope="module")
def prompts(loaded, texts):
    return judge.prompt_ids(loaded[1], texts)


def engine_for(loaded, eos_token_id=None):
    model, tokenizer = loaded
    return engines.ContinuousEngine(model, tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
                                          tokenizer.pad_token_id)


def count_forwards(monkeypatch, model, fail_after=None) -> list[int]:
    """Counts the judge's forward passes; after `fail_after` of them, each raises CUDA's out-of-memory error."""
    calls, forward = [0], model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        if fail_after is not None and calls[0] > fail_after:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return calls


def track_caches(monkeypatch) -> list:
    """Every paged cache the library builds or refuses to build (no memory left for it): (weak reference or None,
    device type, batch tokens, tokens it holds)."""
    built, init = [], paged.PagedAttentionCache.__init__
    signature = inspect.signature(init)

    def tracked(self, *args, **kwargs):
        given = signature.bind(self, *args, **kwargs).arguments
        device, config = torch.device(given["device"]).type, given["continuous_batching_config"]
        try:
            init(self, *args, **kwargs)
        except (MemoryError, ValueError):
            built.append((None, device, config.max_batch_tokens, 0))
            raise
        built.append((weakref.ref(self), device, config.max_batch_tokens, self.num_blocks * config.page_size))

    monkeypatch.setattr(paged.PagedAttentionCache, "__init__", tracked)
    return built


def generation_threads():
    return [t for t in threading.enumerate() if "_run_generation_loop" in t.name and t.is_alive()]


def test_a_failed_chunk_frees_its_cache_and_leaves_the_callers_rng(loaded, prompts, monkeypatch):
    """An out-of-memory error in the generation thread fails the chunk's pairs; its paged cache is gone when answer()
    returns (automatic collection off: nothing but the engine frees it), and the next chunk runs as before."""
    engine = engine_for(loaded)
    expected = engine.answer(prompts, [8] * len(prompts))
    built = track_caches(monkeypatch)
    calls = count_forwards(monkeypatch, loaded[0], fail_after=2)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    gc.disable()
    try:
        failed = engine.answer(prompts, [8] * len(prompts))
        alive = [ref() is not None for ref, *_ in built]  # one cache: the CPU's, sized to the chunk
    finally:
        gc.enable()
    assert failed == [engines.Failed("continuous batching: CUDA out of memory (injected)")] * len(prompts)
    assert calls[0] == 3 and alive == [False]  # the failing step ran, and its cache did not outlive the chunk
    assert torch.equal(torch.get_rng_state(), rng)  # the library's seeding of torch stayed inside the chunk
    assert not generation_threads()
    monkeypatch.undo()
    assert engine.answer(prompts, [8] * len(prompts)) == expected


def test_an_exception_while_results_are_awaited_stops_the_thread_at_once(loaded, prompts, monkeypatch):
    """Ctrl-C while answer() waits for results: the generation thread stops after its current step, where the
    library's context manager would first finish the chunk. No stop token here, so each answer runs to its budget:
    the whole chunk is 1 prefill + 199 decoding steps."""
    engine = engine_for(loaded, eos_token_id=-1)
    calls = count_forwards(monkeypatch, loaded[0])
    assert [a["n_new_tokens"] for a in engine.answer(prompts, [200] * len(prompts))] == [200] * len(prompts)
    assert calls[0] == 200
    calls[0] = 0

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ContinuousBatchingManager, "get_result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.answer(prompts, [200] * len(prompts))
    assert calls[0] < 50 and not generation_threads()  # a step or two, not the 200
    assert loaded[0].config._attn_implementation == "sdpa"  # the model is left as it was loaded


def test_the_checkpoints_generation_config_is_decoded_as_the_static_loop_decodes_it(loaded, texts, prompts,
                                                                                   monkeypatch):
    """Sampling settings in the checkpoint's generation_config.json (Llama-2's) give way to greedy decoding in both
    engines, as GREEN's generate() call does; a logits processor (a repetition penalty), which generate() would apply
    to static batches and the library may drop, is refused by name before any work."""
    model, tokenizer = loaded
    monkeypatch.setattr(model, "generation_config", copy.deepcopy(model.generation_config))
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9)
    static = judge.generate_responses(model, tokenizer, texts, 12)
    continuous = engine_for(loaded).answer(prompts, [12] * len(prompts))
    assert [judge.engine_response(tokenizer, p, a) for p, a in zip(prompts, continuous)] == static
    assert len({r["response"] for r in static}) > 1  # the pairs get different answers: a real comparison
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match=r"generation_config.json asks for RepetitionPenaltyLogitsProcessor: "
                                         r"continuous batching would not .* JUDGE_ENGINE='static'"):
        engine_for(loaded)
    model.generation_config.update(repetition_penalty=1.0, num_beams=3)  # beams: no processor, another search
    with pytest.raises(ValueError, match=r"generation_config.json asks for beam_search: continuous batching"):
        engine_for(loaded)


@contextmanager
def on_a_gpu(free_bytes: int, capability=(7, 5)):
    """A GPU of `capability` with `free_bytes` free (16 GiB in all), as far as torch.cuda tells the code (mocked)."""
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.mem_get_info", return_value=(free_bytes, 16 * 2**30)), \
            mock.patch("torch.cuda.synchronize"), mock.patch("torch.cuda.get_device_capability", return_value=capability):
        yield


def test_on_a_gpu_the_cache_is_sized_by_the_library_and_an_oversized_pair_is_refused_before_work(
        loaded, prompts, monkeypatch):
    """The batch tokens are the library's default where the free memory holds the longest sequence beside them, fewer
    where it does not (each sizing the library's own, on the meta device; the cache it then builds is the one sized),
    and a pair no cache could hold is refused, named, before any forward pass or generation thread."""
    engine, budgets = engine_for(loaded), [20] * len(prompts)
    longest = max(map(len, prompts)) + 20
    expected = engine.answer(prompts, budgets)
    built = track_caches(monkeypatch)
    sizings = {}
    for label, free in (("roomy", 2**30), ("tight", 40 * 2**20)):
        built.clear()
        with on_a_gpu(free):
            assert engine.answer(prompts, budgets) == expected
        sizings[label] = [(device, tokens, holds) for _, device, tokens, holds in built]
    roomy, tight = sizings["roomy"], sizings["tight"]
    assert roomy[0] == ("meta", 8192, roomy[0][2]) and roomy[0][2] >= longest and roomy[1] == ("cpu", *roomy[0][1:])
    # tight: the first batch tokens whose cache holds the longest sequence, and the cache built is that one
    *too_small, fitted, real = tight
    assert all(device == "meta" and holds < longest for device, _, holds in too_small)
    assert fitted[0] == "meta" and fitted[1] < 8192 and fitted[2] >= longest and real == ("cpu", *fitted[1:])

    built.clear()
    calls = count_forwards(monkeypatch, loaded[0])
    with on_a_gpu(2**20):
        with pytest.raises(MemoryError, match=rf"one GREEN sequence of {longest} tokens \(prompt \+ answer budget\) "
                                              r"does not fit: .* holds 0 tokens at most \(at 256 batch tokens\); use "
                                              r"JUDGE_ENGINE='static'"):
            engine.answer(prompts, budgets)
    # every batch-token count was sized (on the meta device) and none held it: no cache, no step, no thread
    assert [(device, tokens) for _, device, tokens, _ in built] == [("meta", n) for n in engines.BATCH_TOKENS]
    assert calls[0] == 0 and not generation_threads()
    assert loaded[0].config._attn_implementation == "sdpa"


def test_flash_attention_only_from_compute_capability_8(loaded, prompts):
    """Flash attention 2 does not run on a T4 (7.5), and the library would fetch a kernel for it from the Hub: its
    automatic switch is allowed only from 8.0 on (and never on the CPU)."""
    engine = engine_for(loaded)
    assert engine.cache_config(prompts, [8] * len(prompts)).auto_switch_to_flash is False  # the CPU
    for capability, allowed in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        with mock.patch("torch.cuda.is_available", return_value=True), \
                mock.patch("torch.cuda.get_device_capability", return_value=capability):
            assert engine.cache_config(prompts, [8] * len(prompts)).auto_switch_to_flash is allowed, capability
