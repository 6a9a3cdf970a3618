"""The GREEN judge's engines: continuous batching and an OpenAI-compatible server give the static loop's answers,
and the server engine's failures (a server killed mid-run, 500s, timeouts, a wrong URL) are retried, counted, never
cached.

The servers are real: a plain `transformers serve` of the demo judge's folder (the CLI as a user runs it, nothing
prepared), started once for the module on 127.0.0.1 with a free port and stopped at the end. The 500s, timeouts,
length refusals and API keys come from a stdlib `http.server` stub that counts tokens with the judge's own tokenizer
(a real server cannot be made to fail on demand); the stub and vLLM's command are in test_judge_servers.py.
"""
from collections import Counter

import pytest

from helpers.core import data, settings
from helpers.judge import engines, judge, servers
from helpers.demo import tiny_models
from helpers.evaluate import green
from helpers.core.data import REGIONS
from helpers.core.storage import JsonlStore

MAX_NEW_TOKENS = settings.PROFILES["demo"]["judge_max_new_tokens"]


def sample_pairs(studies, count: int) -> list[tuple[str, str]]:
    """Distinct (reference, candidate) region pairs of consecutive studies, plus an empty candidate."""
    pairs = dict.fromkeys((a.regions[r], b.regions[r]) for a, b in zip(studies, studies[1:])
                          if a.regions and b.regions for r in REGIONS if a.regions[r])
    return list(pairs)[:count - 1] + [(studies[0].regions["lung"], "")]


@pytest.fixture(scope="module")
def pairs(sample_studies):
    return sample_pairs(data.by_split(sample_studies, "test") + data.by_split(sample_studies, "train"), 8)


@pytest.fixture(scope="module")
def served(green_judge_dir, tmp_path_factory):
    """A plain `transformers serve` of the demo judge's folder, as shipped (fp32, as the in-process judge on the CPU),
    stopped after the module."""
    port = servers.free_port()
    command = [str(servers.TRANSFORMERS_CLI), "serve", str(green_judge_dir), "--host", "127.0.0.1", "--port",
               str(port), "--dtype", "float32", "--device", "cpu"]
    server = servers.ServerProcess(command, port, tmp_path_factory.mktemp("serve") / "log").wait_ready(300)
    yield server
    server.stop()
    assert server.process.poll() is not None


@pytest.fixture(scope="module")
def static_records(green_judge_dir, pairs, tmp_path_factory):
    cache = tmp_path_factory.mktemp("static") / "cache.jsonl"
    return judge.Judge(str(green_judge_dir), cache, max_new_tokens=MAX_NEW_TOKENS).judge(pairs)


def answers(records):
    return [(r["response"], r["n_new_tokens"], r["truncated"]) for r in records]


def test_three_engines_give_the_same_answers_and_tables(tmp_path, green_judge_dir, sample_studies, served):
    """On the demo judge in fp32: continuous batching and a plain `transformers serve` of its folder (at a URL ending
    in /v1/) answer every pair as the static loop does, so GREEN's tables are the same. The label names the engine
    (static, GREEN's own loop, unnamed), so in one cache no engine's answers stand in for another's: on a GPU they may
    differ (gpu_check measures how often)."""
    test = data.by_split(sample_studies, "test")
    systems = {"shifted": {"test": {s.id: {"regions": t.regions} for s, t in zip(test, test[1:] + test[:1])}}}
    refs = {"test": test}
    results = {}
    for engine, url in (("static", None), ("continuous", None), ("server", f"{served.url}/v1/")):
        judged = judge.Judge(str(green_judge_dir), tmp_path / "cache.jsonl", max_new_tokens=MAX_NEW_TOKENS,
                             engine=engine, url=url)
        frame = green.evaluate(systems, refs, judged)
        table, ci = green.green_tables(frame, green.region_stats(frame), "shifted", n_boot=50, seed=0)
        results[engine] = frame.drop(columns=["judge", "key"]), table, ci, judged.label
        judged.release()
    static_frame = results["static"][0]
    assert static_frame.response.nunique() > 2  # the answers differ between pairs: a real comparison
    for engine in ("continuous", "server"):
        assert results[engine][0].equals(static_frame), engine  # answers, token counts, GREEN's parse
        assert results[engine][1].equals(results["static"][1]) and results[engine][2].equals(results["static"][2])
    labels = {engine: result[3] for engine, result in results.items()}
    assert labels == {"static": f"{green_judge_dir} (fp32)", "continuous": f"{green_judge_dir} (fp32, continuous "
                      "batching)", "server": f"{green_judge_dir} (fp32, OpenAI-compatible server)"}
    assert labels["continuous"] == judge.judge_label(str(green_judge_dir), engine="continuous")
    cached = Counter((r["judge"], r["engine"]) for r in JsonlStore(tmp_path / "cache.jsonl").records.values())
    unique = len(static_frame.drop_duplicates(["reference", "candidate"]))
    assert cached == {(label, engine): unique for engine, label in labels.items()}  # each engine judged every pair


def test_the_judge_tokenizes_as_green_and_a_server_gets_text_that_reads_back_as_its_ids(green_judge_dir):
    """GREEN's tokenizer (add_eos_token=True under green-score's transformers 4.40) puts BOS, the prompt, EOS;
    transformers 5 would drop BOS (judge.load_tokenizer). The text a server gets reads back, under the folder's own
    tokenizer, as exactly those ids (GREEN's EOS as "</s>"); ids no text gives are refused before any request."""
    ours, shipped = judge.load_tokenizer(str(green_judge_dir)), judge.shipped_tokenizer(str(green_judge_dir))
    text = judge.chat_text(ours, "Heart size is normal.", "Mild cardiomegaly.")
    ids = judge.prompt_ids(ours, [text])[0]
    assert ids == [ours.bos_token_id] + shipped(text, add_special_tokens=False)["input_ids"] + [ours.eos_token_id]
    trained, answer_start = tiny_models.answer_example(shipped, "Heart size is normal.", "Mild cardiomegaly.")
    assert trained[:answer_start] == ids  # the demo judge learnt GREEN's format on exactly these ids
    assert engines.served_texts(shipped, [ids]) == [text + ours.eos_token]
    merged = shipped("Heart", add_special_tokens=False)["input_ids"]
    assert len(merged) == 1  # one token; spelt letter by letter it is ids that no text gives
    spelt = [shipped.convert_tokens_to_ids(c) for c in "▁Heart"]
    with pytest.raises(engines.JudgeServerError, match="has no text that the judge's own tokenizer reads back"):
        engines.served_texts(shipped, [ids, [ours.bos_token_id, *spelt, ours.eos_token_id]])


def test_a_server_killed_mid_run_fails_its_pairs_and_a_rerun_judges_only_those(
        tmp_path, green_judge_dir, pairs, served, static_records, capsys):
    doomed = servers.transformers_serve(green_judge_dir, tmp_path / "doomed")
    cache = tmp_path / "cache.jsonl"
    judged = judge.Judge(str(green_judge_dir), cache, max_new_tokens=MAX_NEW_TOKENS, engine="server", url=doomed.url)
    judged.runner = engines.ServerEngine(doomed.url, concurrency=2, max_retries=1)
    judged.runner.chunk_size = 4
    append = judged.store.append

    def kill_after_first_chunk(records):
        append(records)
        doomed.process.kill()  # SIGKILL: no goodbye to the requests after these
        doomed.process.wait()

    judged.store.append = kill_after_first_chunk
    with pytest.raises(judge.JudgeFailed, match=rf"{len(pairs) - 4} of {len(pairs)} pairs failed and were not "
                                                rf"cached \({len(pairs) - 4} x {doomed.url} stopped answering"):
        judged.judge(pairs)
    assert len(JsonlStore(cache)) == 4
    capsys.readouterr()
    rerun = judge.Judge(str(green_judge_dir), cache, max_new_tokens=MAX_NEW_TOKENS, engine="server", url=served.url)
    records = rerun.judge(pairs)
    assert f"4 cached, {len(pairs) - 4} to judge" in capsys.readouterr().out
    assert answers(records) == answers(static_records)


@pytest.mark.parametrize("precision, load_in_4bit", [("fp16", False), ("bf16", False), ("fp16", True)])
def test_continuous_batching_answers_as_static_in_each_profiles_numerics(tmp_path, green_judge_dir, pairs, precision,
                                                                         load_in_4bit):
    """The GPU profiles' judge numerics on the CPU: fp16 and bf16 weights, and bitsandbytes' 4-bit nf4 with fp16
    compute (the T4's); continuous batching gives the static loop's answers in each."""
    dtype = settings.torch_dtype(precision)
    records = {engine: judge.Judge(str(green_judge_dir), tmp_path / f"{engine}.jsonl", dtype=dtype,
                                   load_in_4bit=load_in_4bit, max_new_tokens=MAX_NEW_TOKENS, engine=engine).judge(pairs)
               for engine in ("static", "continuous")}
    assert answers(records["continuous"]) == answers(records["static"])
    assert {r["engine"] for r in records["continuous"]} == {"continuous"}
