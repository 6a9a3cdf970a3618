"""The GREEN judge's engines: continuous batching and an OpenAI-compatible server give the static loop's answers,
and the server engine's failures (a server killed mid-run, 500s, timeouts, a wrong URL) are retried, counted, never
cached.

The servers are real: `transformers serve` on the demo judge, started once for the module on 127.0.0.1 with a free
port and stopped at the end; the 500s and timeouts come from a stdlib `http.server` stub (a real server cannot be made
to fail on demand). vLLM needs a GPU: only its command is checked here.
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import data, green, judge, judge_engines, judge_server, settings
from helpers.data import REGIONS
from helpers.storage import JsonlStore

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
    """`transformers serve` on the demo judge (fp32, as the in-process judge on the CPU), stopped after the module."""
    server = judge_server.transformers_serve(green_judge_dir, judge.load_tokenizer(str(green_judge_dir)),
                                             tmp_path_factory.mktemp("serve"))
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
    """On the demo judge in fp32: continuous batching and `transformers serve` answer every pair as the static loop
    does, so GREEN's tables are the same; in-process engines share the label (and cache), the server's names it."""
    test = data.by_split(sample_studies, "test")
    systems = {"shifted": {"test": {s.id: {"regions": t.regions} for s, t in zip(test, test[1:] + test[:1])}}}
    refs = {"test": test}
    results = {}
    for engine, url in (("static", None), ("continuous", None), ("server", served.url)):
        judged = judge.Judge(str(green_judge_dir), tmp_path / f"{engine}.jsonl", max_new_tokens=MAX_NEW_TOKENS,
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
    assert results["continuous"][3] == results["static"][3] == judge.judge_label(str(green_judge_dir))
    assert results["server"][3] == f"{green_judge_dir} (fp32, OpenAI-compatible server)"


def test_the_served_judge_tokenizes_as_the_judge(green_judge_dir, tmp_path):
    """The text a server tokenizes becomes the in-process ids (BOS and GREEN's appended EOS as the judge's tokenizer
    puts them), with the tokenizer `transformers serve` loads from the prepared folder."""
    from transformers import AutoProcessor

    ours = judge.load_tokenizer(str(green_judge_dir))
    folder = judge_server.served_judge_dir(green_judge_dir, ours, tmp_path / "served")
    theirs = AutoProcessor.from_pretrained(folder)  # as transformers serve's model manager loads it
    text = judge.chat_text(ours, "Heart size is normal.", "Mild cardiomegaly.")
    ids = judge.prompt_ids(ours, [text])[0]
    assert theirs(text)["input_ids"] == ids and ids[-1] == ours.eos_token_id


def test_a_server_killed_mid_run_fails_its_pairs_and_a_rerun_judges_only_those(
        tmp_path, green_judge_dir, pairs, served, static_records, capsys):
    doomed = judge_server.transformers_serve(green_judge_dir, judge.load_tokenizer(str(green_judge_dir)),
                                             tmp_path / "doomed")
    cache = tmp_path / "cache.jsonl"
    judged = judge.Judge(str(green_judge_dir), cache, max_new_tokens=MAX_NEW_TOKENS, engine="server", url=doomed.url)
    judged.runner = judge_engines.ServerEngine(doomed.url, concurrency=2, max_retries=1)
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


class Stub(BaseHTTPRequestHandler):
    """/health answers; /v1/completions answers 500, sleeps past the client's timeout, or answers with the wrong
    prompt token count, by the prompt's first word; every completion request is counted."""
    requests: list[str] = []

    def do_GET(self):
        self.reply(200 if self.path == "/health" else 404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kind = body["prompt"].split()[0]
        self.requests.append(kind)
        if kind == "slow":
            time.sleep(1.5)
        if kind in ("fail", "slow"):
            return self.reply(500, {"error": {"message": "stub"}})
        self.reply(200, {"id": "x", "object": "text_completion", "created": 0, "model": "stub",
                         "choices": [{"text": " answer", "index": 0, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    def reply(self, status, payload):
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    Stub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_500s_and_timeouts_are_retried_then_counted(stub):
    engine = judge_engines.ServerEngine(stub, concurrency=3, timeout=0.5, max_retries=2)
    assert engine.flavor == "OpenAI-compatible server"  # no /version: text prompts
    got = engine.answer([[1, 2, 3]] * 3, [8] * 3, ["ok prompt", "fail prompt", "slow prompt"])
    assert got[0] == {"text": " answer", "n_new_tokens": 2, "truncated": False}
    assert got[1] == judge_engines.Failed(f"{stub}: HTTP 500 after retries")
    assert got[2] == judge_engines.Failed(f"{stub}: APITimeoutError after retries")
    assert Stub.requests.count("fail") == Stub.requests.count("slow") == 3  # the first try and 2 retries each
    # a server that reads the prompt as other tokens (BOS, GREEN's EOS) is refused outright
    with pytest.raises(judge_engines.JudgeServerError, match="read a prompt as 3 tokens where the judge's tokenizer "
                                                             "makes 4"):
        engine.answer([[1, 2, 3, 4]], [8], ["ok prompt"])


def test_failed_pairs_are_counted_and_never_cached(stub, tmp_path, green_judge_dir, monkeypatch):
    """Through the judge: the stub's failures raise JudgeFailed with their count after the rest is cached."""
    cache = tmp_path / "cache.jsonl"
    judged = judge.Judge(str(green_judge_dir), cache, max_new_tokens=MAX_NEW_TOKENS, engine="server", url=stub)
    judged.runner = judge_engines.ServerEngine(stub, concurrency=2, timeout=5, max_retries=1)
    monkeypatch.setattr(judge, "chat_text", lambda tokenizer, reference, candidate: f"{reference} {candidate}")
    monkeypatch.setattr(judge, "prompt_ids", lambda tokenizer, texts: [[1, 2, 3]] * len(texts))
    with pytest.raises(judge.JudgeFailed, match=rf"1 of 2 pairs failed and were not cached \(1 x {stub}: HTTP 500"):
        judged.judge([("ok", "a"), ("fail", "b")])
    assert [r["reference"] for r in JsonlStore(cache).records.values()] == ["ok"]


def test_a_wrong_url_is_refused_before_any_work(tmp_path, green_judge_dir):
    url = f"http://127.0.0.1:{judge_server.free_port()}"  # nothing listens there
    with pytest.raises(judge_engines.JudgeServerError, match=f"JUDGE_URL {url}: no OpenAI-compatible server answers"):
        judge.Judge(str(green_judge_dir), tmp_path / "cache.jsonl", engine="server", url=url)
    assert not (tmp_path / "cache.jsonl").exists()
    with pytest.raises(ValueError, match="JUDGE_ENGINE 'fast'"):
        judge.Judge(str(green_judge_dir), tmp_path / "cache.jsonl", engine="fast")


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


def test_answer_budget_and_vllm_command():
    assert judge.answer_budget(500, 16) == 16 and judge.answer_budget(2040, 2048) == 8
    assert judge.answer_budget(2048, 2048) == 1  # a prompt filling GREEN's budget still gets one, counted, token
    t4 = judge_server.vllm_command("StanfordAIMI/GREEN-RadLlama2-7b", 8123, load_in_4bit=True)
    assert t4[1:3] == ["serve", "StanfordAIMI/GREEN-RadLlama2-7b"] and t4[-2:] == ["--quantization", "bitsandbytes"]
    assert ["--dtype", "half"] == t4[3:5] and "--max-model-len" in t4 and "2048" in t4
    assert "--quantization" not in judge_server.vllm_command("m", 8123, load_in_4bit=False)
