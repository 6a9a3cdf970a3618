"""`python -m python -m helpers.serve_judge MODEL_DIR --port 8000`: a GREEN judge served by hand through `transformers serve`
(docs/scaling.md). The judge's folder is served as it is: the judge sends text that the folder's own tokenizer reads
as GREEN's prompt ids, and checks that the server does (judge_engines.ServerEngine)."""
from __future__ import annotations

import argparse
import subprocess
import sys

from .judge.servers import transformers_serve_command


def main(argv=None) -> int:
    """`python -m python -m helpers.serve_judge MODEL_DIR --port 8000`: `transformers serve` on a judge folder, in the
    foreground until Ctrl-C; then JUDGE_URL=http://127.0.0.1:8000 (or .../v1)."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", help="float32 on the CPU; float16 as GREEN runs on a GPU")
    args = parser.parse_args(argv)
    command = transformers_serve_command(args.model_dir, args.port, args.dtype)
    print(" ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
