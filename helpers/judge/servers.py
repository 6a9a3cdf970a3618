"""Judge servers the project starts itself: `transformers serve` in our own environment (the CPU too: the tests use
it) and vLLM in a virtual environment of its own on a GPU (vLLM pins its own torch and transformers, so it cannot share
ours). Each runs as a child process in its own session: started on 127.0.0.1 with a free port, ready once `/health`
answers, its log's tail printed if it dies, and stopped (the whole process group) when the judge is released.
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..core.errors import UserError
from ..core.settings import GREEN_TOKEN_BUDGET

VLLM_VERSION = "0.33.0"
VLLM_HOME = Path.home() / ".cache" / "xray-rrg"  # vLLM's environments, one per build, installed once and reused
# NVIDIA drivers: CUDA 13.0 needs 580 or later; CUDA 12.x runs from 525.60.13 on (minor-version compatibility)
CUDA13_DRIVER, CUDA12_DRIVER = (580,), (525, 60, 13)
VLLM_DEFAULT_SHARE = 0.9  # vLLM's default --gpu-memory-utilization
VLLM_MARGIN = 2**30  # room left for vLLM's own CUDA context when its share is computed from the free memory
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


def transformers_serve(model_dir: str | Path, workdir: Path, *, dtype: str = "float32", load_in_4bit: bool = False,
                       port: int | None = None, timeout: float = 300) -> ServerProcess:
    """`transformers serve` on a local judge as it is (greedy by request, one sequence at a time as `generate` runs
    it); the judge sends it text its own tokenizer turns into GREEN's ids (judge_engines.served_texts)."""
    port = port or free_port()
    return ServerProcess(transformers_serve_command(model_dir, port, dtype, load_in_4bit), port,
                         Path(workdir) / "transformers_serve.log").wait_ready(timeout)


def transformers_serve_command(model_dir: str | Path, port: int, dtype: str, load_in_4bit: bool = False) -> list[str]:
    command = [str(TRANSFORMERS_CLI), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--device", "cuda:0" if _has_gpu() else "cpu", "--log-level", "info"]
    return command + (["--quantization", "bnb-4bit"] if load_in_4bit else [])


def vllm_command(model_id: str, port: int, *, load_in_4bit: bool, gpu_memory_utilization: float,
                 vllm_bin: Path) -> list[str]:
    """GREEN's judge as GREEN runs it (fp16, 2,048 tokens in all, plus the one token a prompt that fills them gets, as
    in the static loop); on a T4 quantized in flight by bitsandbytes."""
    command = [str(vllm_bin), "serve", model_id, "--dtype", "half", "--max-model-len", str(GREEN_TOKEN_BUDGET + 1),
               "--gpu-memory-utilization", f"{gpu_memory_utilization:.2f}", "--host", "127.0.0.1", "--port", str(port),
               "--seed", "0", "--generation-config", "vllm"]
    return command + (["--quantization", "bitsandbytes"] if load_in_4bit else [])


def gpu_memory_utilization(free: int, total: int, margin: int = VLLM_MARGIN) -> float:
    """vLLM's --gpu-memory-utilization (its share of the whole GPU; 0.9 by default) from the memory free now, less
    `margin` for vLLM's own CUDA context: vLLM refuses to start when less than its share is free, and this process's
    CUDA context and tensors are not free."""
    share = min(VLLM_DEFAULT_SHARE, math.floor((free - margin) / total * 100) / 100)
    if share <= 0:
        raise UserError(f"only {free / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB is free: too little "
                           f"to start vLLM; release the models this process holds first")
    return share


def vllm_build(driver: str) -> str:
    """The vLLM build this NVIDIA driver runs: the default wheel (CUDA 13: driver 580 or later) or the CUDA 12.9
    build (CUDA 12's minor-version compatibility: driver 525.60.13 or later); an older driver is refused."""
    version = tuple(int(part) for part in driver.split("."))
    if version >= CUDA13_DRIVER:
        return "cu130"
    if version >= CUDA12_DRIVER:
        return "cu129"
    raise UserError(f"NVIDIA driver {driver} is too old for vLLM {VLLM_VERSION} (its CUDA 12.9 build needs "
                       f"{'.'.join(map(str, CUDA12_DRIVER))} or later): update the driver, or use "
                       f"JUDGE_ENGINE='continuous'")


def driver_version() -> str:
    """The NVIDIA driver's version ("550.54.15"), as nvidia-smi reports it for the first GPU."""
    return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], check=True,
                          capture_output=True, text=True).stdout.split()[0]


def pip_install_vllm(build: str) -> list[str]:
    """pip's arguments for vLLM's `build`: the default wheel from PyPI, or the CUDA 12.9 one from vLLM's index for
    this version (wheels.vllm.ai/<version>/cu129) with its torch from PyTorch's cu129 index."""
    if build == "cu130":
        return [f"vllm=={VLLM_VERSION}", "bitsandbytes"]
    return [f"vllm=={VLLM_VERSION}+{build}", "bitsandbytes", "--extra-index-url",
            f"https://wheels.vllm.ai/{VLLM_VERSION}/{build}", "--extra-index-url",
            f"https://download.pytorch.org/whl/{build}"]


def install_vllm(build: str) -> Path:
    """vLLM's `build` in its own virtual environment, installed once (pip's output is the progress) and reused after;
    its `vllm` executable."""
    venv = VLLM_HOME / f"vllm-{VLLM_VERSION}-{build}"
    if not (venv / "bin" / "vllm").is_file():
        print(f"installing vLLM {VLLM_VERSION} ({build} build) into {venv} (once; several minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", *pip_install_vllm(build)], check=True)
    return venv / "bin" / "vllm"


def vllm_serve(model_id: str, workdir: Path, *, load_in_4bit: bool, token: str | None = None,
               port: int | None = None, timeout: float = 1800) -> ServerProcess:
    """vLLM serving the judge on this machine's GPU (the build its driver runs, installed on first use), with the
    share of the GPU that is free now; the HF token goes to the child's environment, never to its command line or
    log."""
    if not _has_gpu():
        raise UserError("JUDGE_ENGINE='server' without JUDGE_URL starts vLLM, which needs a GPU; on the CPU set "
                           "JUDGE_URL (e.g. a `transformers serve` you started) or use JUDGE_ENGINE='continuous'")
    import torch

    vllm_bin = install_vllm(vllm_build(driver_version()))
    share = gpu_memory_utilization(*torch.cuda.mem_get_info())
    port = port or free_port()
    env = {**os.environ, **({"HF_TOKEN": token} if token else {})}
    command = vllm_command(model_id, port, load_in_4bit=load_in_4bit, gpu_memory_utilization=share, vllm_bin=vllm_bin)
    return ServerProcess(command, port, Path(workdir) / "vllm_serve.log", env).wait_ready(timeout)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
