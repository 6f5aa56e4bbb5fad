"""The load generator: C requests in flight on keep-alive connections, in a process of its own, recording each
request's latency (closed loop: a client sends its next request when the last is answered)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time

from harness import CONTENT_LENGTH, percentile


async def _worker(
    port: int, requests: list[bytes], start: float, stop: float, out: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = random.randrange(len(requests))
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            match = CONTENT_LENGTH.search(head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            t1 = time.perf_counter()
            status = int(head[9:12])
            if t0 >= start:  # only requests started after the warm-up count
                if status == 200:
                    out.append(t1 - t0)
                else:
                    errors.append(status)
    finally:
        writer.close()


def _load_process(
    port: int, requests: list[bytes], concurrency: int, warmup: float, duration: float, queue: mp.Queue
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    cpu: list[float] = []

    async def measure_cpu(start: float, stop: float) -> None:
        """This process's CPU time over the measured window: the load generator's share of the machine."""
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu.append(time.process_time())
        await asyncio.sleep(max(0.0, stop - time.perf_counter()))
        cpu.append(time.process_time())

    async def main() -> tuple[list[float], list[int], float]:
        latencies: list[float] = []
        errors: list[int] = []
        start = time.perf_counter() + warmup
        stop = start + duration
        await asyncio.gather(
            measure_cpu(start, stop),
            *(_worker(port, requests, start, stop, latencies, errors) for _ in range(concurrency)),
        )
        return latencies, errors, duration

    latencies, errors, duration = asyncio.run(main())
    client_cores = (cpu[1] - cpu[0]) / duration if len(cpu) == 2 else float("nan")
    queue.put({"latencies": latencies, "errors": errors, "duration": duration, "client_cores": client_cores})


def run_load(
    port: int, requests: list[bytes], concurrency: int, warmup: float, duration: float, keep: bool = False
) -> dict[str, float]:
    """Summary of one load run; with ``keep``, also the raw latencies (seconds) under "latencies"."""
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(
        target=_load_process, args=(port, requests, concurrency, warmup, duration, queue)
    )
    proc.start()
    result = queue.get(timeout=warmup + duration + 120)
    proc.join()
    summary = summarise(result["latencies"], result["duration"], concurrency, len(result["errors"]))
    return {**({"latencies": result["latencies"]} if keep else {}), **summary, "client_cores": result["client_cores"]}


def summarise(latencies: list[float], duration: float, concurrency: int, errors: int) -> dict[str, float]:
    """Requests per second and latency percentiles (ms) of one closed-loop run."""
    return {
        "concurrency": concurrency,
        "rps": len(latencies) / duration,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "errors": errors,
    }
