"""The judge's server engine against failures a real server cannot be made to give on demand, and the vLLM server's
command, build and memory share.

The 500s, timeouts, length refusals and API keys come from a stdlib `http.server` stub on 127.0.0.1 that counts tokens
with the judge's own tokenizer; vLLM needs a GPU and cannot run here, so its replies (token ids, `/version`, its 400
for a prompt over --max-model-len) are the stub's, and only its command and install choice are checked (the GPU and the
driver are mocked where a test says so).
"""
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers.core import settings
from helpers.judge import engines, judge, servers
from helpers.core.errors import UserError
from helpers.core.storage import JsonlStore

MAX_NEW_TOKENS = settings.PROFILES["demo"]["judge_max_new_tokens"]


class Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible server on demand. /health answers; /version only as vLLM (`vllm_max_len` set), which then
    takes token ids, returns the prompt's and the answer's ids, and refuses with vLLM's 400 a prompt whose answer
    budget passes --max-model-len. Prompt tokens are counted with the judge's own tokenizer, as a real server counts
    them. A completion fails by a marker in its prompt: FAIL500 (HTTP 500), SLOW (past the client's timeout), BADREQ
    (a 400 of another kind). Each completion's marker and each request's Authorization header are recorded; with
    `api_key` set, /v1/ refuses any other key with 401, as vLLM's --api-key does."""
    tokenizer = None
    vllm_max_len: int | None = None
    api_key: str | None = None
    requests: list[str] = []
    authorizations: list[str | None] = []

    def do_GET(self):
        self.authorizations.append(self.headers.get("Authorization"))
        if self.path == "/version" and self.vllm_max_len:
            return self.reply(200, {"version": "0.33.0"})
        self.reply(200 if self.path == "/health" else 404, {})

    def do_POST(self):
        self.authorizations.append(self.headers.get("Authorization"))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.reply(401, {"error": {"message": "Unauthorized"}})
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
        kind = next((k for k in ("FAIL500", "SLOW", "BADREQ") if k in text), "ok")
        self.requests.append(kind)
        if kind == "SLOW":
            time.sleep(1.5)
        if kind in ("FAIL500", "SLOW"):
            return self.reply(500, {"error": {"message": "stub"}})
        if kind == "BADREQ":
            return self.reply(400, {"error": {"message": "temperature must be non-negative"}})
        if self.vllm_max_len and len(ids) + body["max_tokens"] > self.vllm_max_len:  # vLLM's wording (0.11 on)
            return self.reply(400, {"error": {"message": (
                f"This model's maximum context length is {self.vllm_max_len} tokens. However, you requested "
                f"{body['max_tokens']} output tokens and your prompt contains at least {len(ids)} input tokens, for "
                f"a total of at least {len(ids) + body['max_tokens']} tokens."), "type": "BadRequestError"}})
        choice = {"text": " answer", "index": 0, "finish_reason": "stop"}
        if self.vllm_max_len:
            choice |= {"prompt_token_ids": ids, "token_ids": [*self.tokenizer(" answer")["input_ids"][1:],
                                                              self.tokenizer.eos_token_id]}
        self.reply(200, {"id": "x", "object": "text_completion", "created": 0, "model": "stub", "choices": [choice],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": 2,
                                   "total_tokens": len(ids) + 2}})

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
def stub(green_judge_dir):
    """The stub's URL; set Stub.vllm_max_len or Stub.api_key in the test (reset here)."""
    Stub.tokenizer = judge.shipped_tokenizer(str(green_judge_dir))
    Stub.vllm_max_len = Stub.api_key = None
    Stub.requests, Stub.authorizations = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_500s_and_timeouts_are_retried_then_counted(stub):
    engine = engines.ServerEngine(f"{stub}/v1", concurrency=3, timeout=0.5, max_retries=2)
    assert engine.url == stub and engine.flavor == "OpenAI-compatible server"  # no /version: text prompts
    texts = ["ok prompt", "FAIL500 prompt", "SLOW prompt"]
    prompts = Stub.tokenizer(texts)["input_ids"]
    got = engine.answer(prompts, [8] * 3, texts)
    assert got[0] == {"text": " answer", "n_new_tokens": 2, "truncated": False}
    assert got[1] == engines.Failed(f"{stub}: HTTP 500 after retries")
    assert got[2] == engines.Failed(f"{stub}: APITimeoutError after retries")
    assert Stub.requests.count("FAIL500") == Stub.requests.count("SLOW") == 3  # the first try and 2 retries each
    # a server that reads the prompt as other tokens (BOS, GREEN's EOS) is refused outright
    n = len(prompts[0])
    with pytest.raises(engines.JudgeServerError, match=f"read a prompt as {n} tokens where the judge's tokenizer "
                                                             f"makes {n + 1}"):
        engine.answer([prompts[0] + [2]], [8], ["ok prompt"])
    with pytest.raises(engines.JudgeServerError, match=r"refused the request \(400\)"):  # not for length: fatal
        engine.answer(prompts[:1], [8], ["BADREQ prompt"])


def test_failed_pairs_are_counted_and_never_cached(stub, tmp_path, green_judge_dir):
    """Through the judge: the stub's failures raise JudgeFailed with their count after the rest is cached."""
    cache = tmp_path / "cache.jsonl"
    judged = judge.Judge(str(green_judge_dir), cache, max_new_tokens=MAX_NEW_TOKENS, engine="server", url=stub)
    judged.runner = engines.ServerEngine(stub, concurrency=2, timeout=5, max_retries=1)
    with pytest.raises(judge.JudgeFailed, match=rf"1 of 2 pairs failed and were not cached \(1 x {stub}: HTTP 500"):
        judged.judge([("ok", "a"), ("FAIL500", "b")])
    assert [r["reference"] for r in JsonlStore(cache).records.values()] == ["ok"]


def test_a_wrong_url_is_refused_before_any_work(tmp_path, green_judge_dir):
    url = f"http://127.0.0.1:{servers.free_port()}"  # nothing listens there
    with pytest.raises(engines.JudgeServerError, match=f"JUDGE_URL {url}: no OpenAI-compatible server answers"):
        judge.Judge(str(green_judge_dir), tmp_path / "cache.jsonl", engine="server", url=url)
    assert not (tmp_path / "cache.jsonl").exists()
    with pytest.raises(ValueError, match="JUDGE_ENGINE 'fast'"):
        judge.Judge(str(green_judge_dir), tmp_path / "cache.jsonl", engine="fast")


def test_answer_budget_and_vllm_command():
    assert judge.answer_budget(500, 16) == 16 and judge.answer_budget(2040, 2048) == 8
    assert judge.answer_budget(2048, 2048) == 1  # a prompt filling GREEN's budget still gets one, counted, token
    t4 = servers.vllm_command("StanfordAIMI/GREEN-RadLlama2-7b", 8123, load_in_4bit=True,
                                   gpu_memory_utilization=0.83, vllm_bin=servers.VLLM_HOME / "bin" / "vllm")
    assert t4[1:3] == ["serve", "StanfordAIMI/GREEN-RadLlama2-7b"] and t4[-2:] == ["--quantization", "bitsandbytes"]
    assert t4[3:5] == ["--dtype", "half"]
    # room for the one token the static loop gives a prompt that fills GREEN's 2,048 (vLLM refuses it at 2,048)
    assert t4[t4.index("--max-model-len") + 1] == "2049" and t4[t4.index("--gpu-memory-utilization") + 1] == "0.83"
    assert "--quantization" not in servers.vllm_command("m", 8123, load_in_4bit=False, gpu_memory_utilization=0.9,
                                                             vllm_bin=servers.VLLM_HOME / "bin" / "vllm")


LONG_CANDIDATE = " ".join(["Ωμέγα"] * 300)  # byte-fallback tokens: GREEN's prompt passes 2,048 tokens, cut there


@pytest.mark.parametrize("max_model_len", [2048, 2049])
def test_a_prompt_vllm_refuses_for_length_is_counted_and_the_run_goes_on(stub, tmp_path, green_judge_dir,
                                                                          max_model_len):
    """A prompt cut at GREEN's 2,048 tokens gets a one-token budget (as in the static loop). vLLM at --max-model-len
    2048 refuses it with HTTP 400: that pair is counted as failed, the others are judged and cached. At 2049, as the
    project starts vLLM, it is answered. (vLLM's side is the stub's, which answers in vLLM's words.)"""
    Stub.vllm_max_len = max_model_len
    cache = tmp_path / "cache.jsonl"
    judged = judge.Judge(str(green_judge_dir), cache, max_new_tokens=MAX_NEW_TOKENS, engine="server", url=stub)
    assert judged.runner.takes_token_ids and judged.label == f"{green_judge_dir} (fp32, vLLM 0.33.0)"
    pairs = [("Heart size is normal.", LONG_CANDIDATE), ("No effusion.", "Small effusion.")]
    tokenizer = judge.load_tokenizer(str(green_judge_dir))
    assert len(judge.prompt_ids(tokenizer, [judge.chat_text(tokenizer, *pairs[0])])[0]) == judge.GREEN_MAX_LENGTH
    if max_model_len == 2048:
        with pytest.raises(judge.JudgeFailed, match=rf"1 of 2 pairs failed and were not cached \(1 x {stub} refused a "
                                                    rf"prompt for length \(HTTP 400\)"):
            judged.judge(pairs)
        assert [r["candidate"] for r in JsonlStore(cache).records.values()] == ["Small effusion."]
    else:
        assert [r["n_new_tokens"] for r in judged.judge(pairs)] == [2, 2]
    # vLLM's bitsandbytes layers compute in bf16 whatever its --dtype: the label says so
    four_bit = judge.Judge(str(green_judge_dir), tmp_path / "4bit.jsonl", engine="server", url=stub, load_in_4bit=True)
    assert four_bit.label == f"{green_judge_dir} (4-bit nf4, bf16 compute, vLLM 0.33.0)"


def test_the_api_key_reaches_the_server_and_nowhere_else(stub, tmp_path, green_judge_dir, monkeypatch, capsys):
    """JUDGE_API_KEY (Colab's secrets or the environment; here the environment) is sent as the Authorization header of
    every request, and appears in no output, label, record or file."""
    key = f"lab-key-{secrets.token_hex(8)}"
    Stub.api_key = key
    monkeypatch.setenv("JUDGE_API_KEY", key)
    judged = judge.Judge(str(green_judge_dir), tmp_path / "cache.jsonl", max_new_tokens=MAX_NEW_TOKENS,
                         engine="server", url=stub)
    records = judged.judge([("No effusion.", "Small effusion.")])
    assert Stub.requests == ["ok", "ok"]  # the first prompt's one-token check, then the pair: both let in
    assert Stub.authorizations and set(Stub.authorizations) == {f"Bearer {key}"}  # /health and /version too
    printed = capsys.readouterr()
    assert key not in printed.out + printed.err + judged.label + json.dumps(records)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert files and not any(key.encode() in path.read_bytes() for path in files)
    monkeypatch.setenv("JUDGE_API_KEY", "not-the-key")
    with pytest.raises(engines.JudgeServerError, match=r"refused the API key \(HTTP 401\): set the server's key "
                                                             r"as JUDGE_API_KEY") as refused:
        judge.Judge(str(green_judge_dir), tmp_path / "other.jsonl", engine="server", url=stub).judge([("a", "b")])
    assert key not in str(refused.value) and "not-the-key" not in str(refused.value)


@pytest.mark.parametrize("driver, build", [("595.45.04", "cu130"), ("580.65.06", "cu130"), ("575.51.03", "cu129"),
                                           ("550.54.15", "cu129"), ("525.60.13", "cu129")])
def test_the_vllm_build_follows_the_driver(driver, build):
    """Colab's 550 driver runs CUDA 12 only: it gets vLLM's CUDA 12.9 build, from vLLM's index for the pinned version,
    with PyTorch's cu129 torch; a 580+ driver gets the default (CUDA 13) wheel from PyPI."""
    assert servers.vllm_build(driver) == build
    args = servers.pip_install_vllm(build)
    if build == "cu129":
        assert args == [f"vllm=={servers.VLLM_VERSION}+cu129", "bitsandbytes",
                        "--extra-index-url", f"https://wheels.vllm.ai/{servers.VLLM_VERSION}/cu129",
                        "--extra-index-url", "https://download.pytorch.org/whl/cu129"]
    else:
        assert args == [f"vllm=={servers.VLLM_VERSION}", "bitsandbytes"]


def test_a_driver_too_old_is_refused_before_installing(tmp_path, monkeypatch):
    """Mocked: a GPU (none here) and its driver's version."""
    monkeypatch.setattr(servers, "_has_gpu", lambda: True)
    monkeypatch.setattr(servers, "driver_version", lambda: "470.82.01")
    monkeypatch.setattr(servers, "VLLM_HOME", tmp_path / "vllm-home")
    with pytest.raises(UserError, match=r"NVIDIA driver 470.82.01 is too old for vLLM .* needs 525.60.13 or later"):
        servers.vllm_serve("m", tmp_path / "work", load_in_4bit=False)
    assert not (tmp_path / "vllm-home").exists() and not (tmp_path / "work").exists()


def test_vllm_gets_the_free_share_of_the_gpu_less_a_margin():
    """vLLM refuses to start when less than --gpu-memory-utilization x total is free: the share leaves the margin free
    for vLLM's own CUDA context, and is at most vLLM's default 0.9."""
    gib = 2**30
    assert servers.gpu_memory_utilization(79 * gib, 80 * gib) == 0.9  # a GPU to itself: vLLM's default
    # a T4 where this process holds 2 GiB: vLLM's default 0.9 would ask for 13.5 GiB, and 13 are free
    assert servers.gpu_memory_utilization(13 * gib, 15 * gib) == 0.8
    for free in (2 * gib, int(14.3 * gib), int(40.7 * gib), 79 * gib):
        share = servers.gpu_memory_utilization(free, 80 * gib)
        assert share * 80 * gib <= free - servers.VLLM_MARGIN  # vLLM's own check passes, with the margin
    with pytest.raises(UserError, match="only 0.5 GiB of the GPU's 15.0 GiB is free"):
        servers.gpu_memory_utilization(gib // 2, 15 * gib)
