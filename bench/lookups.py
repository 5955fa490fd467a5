"""The lookup floor: the same batched routing requests as the engine, with a minimal client.

Run as ``python -m bench.lookups --url URL --builds N`` in its own process (so it does not share a
GIL with the routing server or the caller); prints one JSON object. Ids are ``"1"`` to ``"N"``
(the generated build ids) in batches of ``--batch-size``, ``--concurrency`` requests in flight on
one keep-alive httpx client. Each answer is parsed and its routed ids counted, the least a real
client must do with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence

import httpx

__all__ = ["LookupFloor", "main", "measure"]

LookupFloor = dict[str, float | int]
JSON_HEADERS = {"content-type": "application/json"}


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


async def measure(
    url: str, builds: int, batch_size: int, concurrency: int, wait_for_go: bool = False
) -> LookupFloor:
    batches = [
        [str(i) for i in range(start, min(start + batch_size, builds + 1))]
        for start in range(1, builds + 1, batch_size)
    ]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    latencies: list[float] = []
    routed = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30.0, trust_env=False) as client:

        async def worker() -> None:
            nonlocal routed
            while not queue.empty():
                ids = queue.get_nowait()
                sent = time.perf_counter()
                response = await client.post(
                    url, content=json.dumps({"ids": ids}).encode(), headers=JSON_HEADERS
                )
                response.raise_for_status()
                results = json.loads(response.content)["results"]
                latencies.append(time.perf_counter() - sent)
                routed += sum(1 for item in results if item["routed"] is True)

        if wait_for_go:
            # Start-up (interpreter, imports) must not count: say so, then wait for the caller.
            print("ready", flush=True)
            sys.stdin.readline()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "requests": len(batches),
        "ids": builds,
        "routed": routed,
        "ids_per_second": builds / seconds if seconds else 0.0,
        "p50_batch_ms": percentile(latencies, 0.50) * 1000,
        "p99_batch_ms": percentile(latencies, 0.99) * 1000,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--builds", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--wait-for-go", action="store_true", help="print 'ready', start on a line on stdin"
    )
    args = parser.parse_args(argv)
    result = asyncio.run(
        measure(args.url, args.builds, args.batch_size, args.concurrency, args.wait_for_go)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
