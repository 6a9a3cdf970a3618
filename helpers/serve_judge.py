"""`python -m helpers.serve_judge MODEL_DIR --port 8000`: a GREEN judge served by hand through `transformers serve`,
prepared as the project serves it, so that JUDGE_URL's answers equal the in-process ones (docs/scaling.md)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .judge import load_tokenizer
from .judge_server import served_judge_dir, transformers_serve_command


def main(argv=None) -> int:
    """`python -m helpers.serve_judge MODEL_DIR --port 8000`: `transformers serve` on a judge prepared as the project
    serves it (`served_judge_dir`), in the foreground until Ctrl-C; then JUDGE_URL=http://127.0.0.1:8000."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", help="float32 on the CPU; float16 as GREEN runs on a GPU")
    parser.add_argument("--workdir", default="artifacts/judge_server")
    args = parser.parse_args(argv)
    served = served_judge_dir(args.model_dir, load_tokenizer(args.model_dir), Path(args.workdir) / "served-judge")
    command = transformers_serve_command(served, args.port, args.dtype)
    print(" ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
