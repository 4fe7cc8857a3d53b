"""Runs tests/openai_server.py's OpenAIServer in its own process (so its JSON work does not share
the engine's GIL, as a real remote provider would not): prints the base URL, serves until stdin
closes."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import openai_server  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

# http.server writes the headers and the body of an answer in two sends; with Nagle's algorithm
# on, the body then waits for the client's delayed ACK (40 ms on Linux), which would be charged
# to the engine. Production servers (nginx, uvicorn) set TCP_NODELAY; so does this one.
openai_server._Handler.disable_nagle_algorithm = True
# socketserver listens with a backlog of 5: when several runs open their connection pools at once
# (4 runs x 4 connections in bench scale_out) on a busy machine, the kernel drops the overflow and
# the client's retry of its SYN comes a whole second later. Production servers listen with
# hundreds (nginx 511, uvicorn 2048).
openai_server._Server.request_queue_size = 128


def _cheap_vector(text: str, dimensions: int) -> np.ndarray:
    # The tests' vector_for seeds a NumPy generator per text (~0.4 ms): at 16 requests of 64
    # inputs per 200 ms that alone is more CPU than this machine has, and the benchmark would
    # measure the fake server instead of the engine. Still a pure function of the text.
    raw = np.frombuffer(hashlib.shake_256(text.encode("utf-8")).digest(4 * dimensions), dtype="<u4")
    vector = raw.astype(np.float32) - 2.0**31
    return vector / np.linalg.norm(vector)


openai_server.vector_for = _cheap_vector


def main() -> None:
    dimensions, latency = int(sys.argv[1]), float(sys.argv[2])
    with OpenAIServer(dimensions=dimensions, latency=latency) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()  # the parent closes our stdin to stop us


if __name__ == "__main__":
    main()
