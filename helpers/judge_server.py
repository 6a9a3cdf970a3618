"""Judge servers the project starts itself: `transformers serve` in our own environment (the CPU too: the tests use
it) and vLLM in a virtual environment of its own on a GPU (vLLM pins its own torch and transformers, so it cannot share
ours). Each runs as a child process in its own session: started on 127.0.0.1 with a free port, ready once `/health`
answers, its log's tail printed if it dies, and stopped (the whole process group) when the judge is released.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

VLLM_VERSION = "0.33.0"
VLLM_VENV = Path.home() / ".cache" / "xray-rrg" / f"vllm-{VLLM_VERSION}"  # installed once per machine, then reused
TRANSFORMERS_CLI = Path(sys.executable).with_name("transformers")
LOG_TAIL_LINES = 40


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One server child process and its log."""

    def __init__(self, command: list[str], port: int, log_path: Path, env: dict | None = None):
        self.command, self.port, self.log_path = command, port, Path(log_path)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w", encoding="utf-8") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        atexit.register(self.stop)  # a notebook or command that ends without releasing the judge

    def log_tail(self) -> str:
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def wait_ready(self, timeout: float) -> "ServerProcess":
        """Back once `/health` answers 200; a RuntimeError with the log's tail if the server exits or never answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the judge server exited with status {self.process.returncode} before it was "
                                   f"ready: {' '.join(self.command)}\nlast lines of {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the judge server did not answer {self.url}/health within {timeout:.0f} s; last lines "
                           f"of {self.log_path}:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the judge server at {self.url} died (status {self.process.returncode}); last lines "
                               f"of {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace: float = 20) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace` seconds; a no-op once it has exited."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        atexit.unregister(self.stop)


def served_judge_dir(model_dir: str | Path, tokenizer, out_dir: Path) -> Path:
    """The judge's files with its tokenizer saved as GREEN sets it up (EOS appended, its chat template): a server
    that reads text tokenizes it as the in-process judge does. Weights are linked, not copied."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    saved = {p.name for p in out_dir.iterdir()}
    for path in Path(model_dir).iterdir():
        if path.name not in saved and not (out_dir / path.name).exists():
            (out_dir / path.name).symlink_to(path.resolve())
    return out_dir


def transformers_serve(model_dir: str | Path, tokenizer, workdir: Path, *, dtype: str = "float32",
                       load_in_4bit: bool = False, port: int | None = None, timeout: float = 300) -> ServerProcess:
    """`transformers serve` on a local judge (greedy by request, one sequence at a time as `generate` runs it)."""
    port = port or free_port()
    served = served_judge_dir(model_dir, tokenizer, Path(workdir) / "served-judge")
    return ServerProcess(transformers_serve_command(served, port, dtype, load_in_4bit), port,
                         Path(workdir) / "transformers_serve.log").wait_ready(timeout)


def transformers_serve_command(served_dir: Path, port: int, dtype: str, load_in_4bit: bool = False) -> list[str]:
    command = [str(TRANSFORMERS_CLI), "serve", str(served_dir), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--device", "cuda:0" if _has_gpu() else "cpu", "--log-level", "info"]
    return command + (["--quantization", "bnb-4bit"] if load_in_4bit else [])


def vllm_command(model_id: str, port: int, *, load_in_4bit: bool, python_bin: Path = VLLM_VENV / "bin") -> list[str]:
    """GREEN's judge as GREEN runs it (fp16, 2,048 tokens in all); on a T4 quantized in flight by bitsandbytes."""
    command = [str(python_bin / "vllm"), "serve", model_id, "--dtype", "half", "--max-model-len", "2048",
               "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--generation-config", "vllm"]
    return command + (["--quantization", "bitsandbytes"] if load_in_4bit else [])


def install_vllm(venv: Path = VLLM_VENV) -> Path:
    """vLLM in its own virtual environment, installed once (pip's output is the progress) and reused after."""
    if not (venv / "bin" / "vllm").is_file():
        print(f"installing vLLM {VLLM_VERSION} into {venv} (once; several minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", f"vllm=={VLLM_VERSION}",
                        "bitsandbytes"], check=True)
    return venv


def vllm_serve(model_id: str, workdir: Path, *, load_in_4bit: bool, token: str | None = None,
               port: int | None = None, timeout: float = 1800) -> ServerProcess:
    """vLLM serving the judge on this machine's GPU (installed on first use); the HF token goes to the child's
    environment, never to its command line or log."""
    if not _has_gpu():
        raise RuntimeError("JUDGE_ENGINE='server' without JUDGE_URL starts vLLM, which needs a GPU; on the CPU set "
                           "JUDGE_URL (e.g. a `transformers serve` you started) or use JUDGE_ENGINE='continuous'")
    venv = install_vllm()
    port = port or free_port()
    env = {**os.environ, **({"HF_TOKEN": token} if token else {})}
    return ServerProcess(vllm_command(model_id, port, load_in_4bit=load_in_4bit, python_bin=venv / "bin"), port,
                         Path(workdir) / "vllm_serve.log", env).wait_ready(timeout)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
