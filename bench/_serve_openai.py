"""Runs tests/openai_server.py's OpenAIServer in its own process (so its JSON work does not share
the engine's GIL, as a real remote provider would not): prints the base URL, serves until stdin
closes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from openai_server import OpenAIServer  # noqa: E402


def main() -> None:
    dimensions, latency = int(sys.argv[1]), float(sys.argv[2])
    with OpenAIServer(dimensions=dimensions, latency=latency) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()  # the parent closes our stdin to stop us


if __name__ == "__main__":
    main()
