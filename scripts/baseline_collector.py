"""Bare baseline collector: the least a correct rollout collector must do, for `scripts/bench.py`'s overhead
figure (collector CPU per rollout / this script's CPU per rollout).

Per row: parse the JSONL line, set `_ng_task_index`/`_ng_rollout_index`, serialize (orjson), `POST
{url}/run` over one shared aiohttp session under an `asyncio.Semaphore(parallelism)`, parse the answer,
set the same indices, append it as one line to a buffered file. Rows are read lazily. Nothing else: no
retries, no metrics, no resume, no per-line durability, no progress.

    python scripts/baseline_collector.py --input rows.jsonl --output out.jsonl --url http://127.0.0.1:8000 \
        --parallelism 64

Runs on asyncio's default loop (`asyncio.run`), as collect_rollouts does. Prints one JSON line,
`{"rollouts": N, "wall_s": S, "active_s": A}` (`active_s`: first request to last answer written, as the
collector's metrics file counts it) and exits 0, or fails with the first error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

HEADERS = {"Content-Type": "application/json"}


async def collect(input_path: Path, output_path: Path, url: str, parallelism: int) -> tuple[int, float]:
    """Post every row of `input_path` to `{url}/run`, at most `parallelism` at once; returns the rows
    written and the seconds from the first request to the last answer written."""
    semaphore = asyncio.Semaphore(parallelism)
    written = 0
    first_request = 0.0

    async def one(session: aiohttp.ClientSession, out: IO[bytes], task: int, body: bytes) -> None:
        nonlocal written
        try:
            async with session.post(url + "/run", data=body, headers=HEADERS) as resp:
                resp.raise_for_status()
                answer: dict[str, Any] = orjson.loads(await resp.read())
            answer["_ng_task_index"], answer["_ng_rollout_index"] = task, 0
            out.write(orjson.dumps(answer, option=orjson.OPT_APPEND_NEWLINE))
            written += 1
        finally:
            semaphore.release()

    connector = aiohttp.TCPConnector(limit=parallelism)
    with input_path.open("rb") as rows, output_path.open("ab") as out:
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            for task, line in enumerate(rows):
                row = orjson.loads(line)
                row["_ng_task_index"], row["_ng_rollout_index"] = task, 0
                await semaphore.acquire()
                first_request = first_request or time.monotonic()
                tg.create_task(one(session, out, task, orjson.dumps(row)))
    return written, time.monotonic() - first_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--url", required=True, help="agent base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--parallelism", type=int, default=64)
    args = parser.parse_args()
    start = time.monotonic()
    written, active_s = asyncio.run(collect(args.input, args.output, args.url.rstrip("/"), args.parallelism))
    summary = {"rollouts": written, "wall_s": time.monotonic() - start, "active_s": active_s}
    print(orjson.dumps(summary).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
