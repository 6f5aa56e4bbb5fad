"""Text generation: gemma-3-270m tokens/s at 1, 4 and 8 concurrent streams, in one run, side by side with the
in-process runtime (int8 weights, as served, and the float32 reference) and (when installed) llama.cpp's own
OpenAI-compatible server on the same GGUF file; with the int8 model's memory and its quality guard's figures.

    python bench/generation.py [--tokens 128] [--rounds 3] [--append docs/benchmarks.md] [--data-dir DIR]

Each stream asks for ``--tokens`` tokens (greedy) and counts the content chunks it receives (one token each on both
servers). Reported per concurrency: aggregate tokens/s, time to first token (p50) and inter-token latency (p50 and
p99 of the gaps between chunks). The load generator runs in this process; the servers in their own.
llama.cpp: ``pip install 'llama-cpp-python[server]'`` (it builds from source, minutes), here or in another
environment named by ``--llama-python``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from harness import free_port, machine, start_server, wait_until_ready

KEY = "om_bench-key-0123456789abcdefghijklmnopqrstuvwxyz"
MODEL = "gemma-3-270m"
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "Here is a recipe for a simple vegetable soup:",
    "The most important lesson I learned at school was",
    "In the year 2050, cities will",
    "The train left the station at dawn and",
    "Scientists have discovered a new species of",
    "My favourite place in the world is",
]
CONCURRENCY = (1, 4, 8)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median_round(measure: Callable[..., Coroutine[Any, Any, dict[str, float]]], rounds: int) -> dict[str, float]:
    """Measure ``rounds`` times and keep the round with the median tokens/s (its other figures with it). Round r
    starts at prompt r (``measure(first=r)``): a server's prompt cache never holds the prompt a stream sends."""
    results = sorted((asyncio.run(measure(first=r)) for r in range(rounds)), key=lambda r: r["tokens_per_s"])
    return results[len(results) // 2]


def summarise(streams: list[dict[str, Any]], wall: float) -> dict[str, float]:
    gaps = [g for s in streams for g in s["gaps"]]
    tokens = sum(s["tokens"] for s in streams)
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(s["ttft"] for s in streams),
        "itl_p50_ms": 1000 * _percentile(gaps, 0.5),
        "itl_p99_ms": 1000 * _percentile(gaps, 0.99),
    }


async def _http_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if choice.get("text"):
                    arrivals.append(time.perf_counter())
    return _stream_stats(started, arrivals)


def _stream_stats(started: float, arrivals: list[float]) -> dict[str, Any]:
    """One stream's token count, time to first token and gaps between tokens."""
    return {
        "tokens": len(arrivals),
        "ttft": (arrivals[0] - started) if arrivals else float("nan"),
        "gaps": [b - a for a, b in itertools.pairwise(arrivals)],
    }


async def http_round(
    base: str, model: str, concurrency: int, tokens: int, key: str | None, first: int = 0
) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as client:
        bodies = [
            {
                "model": model,
                "prompt": PROMPTS[(first + i) % len(PROMPTS)],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
            }
            for i in range(concurrency)
        ]
        started = time.perf_counter()
        streams = await asyncio.gather(*[_http_stream(client, "/v1/completions", b) for b in bodies])
        return summarise(list(streams), time.perf_counter() - started)


async def in_process_round(runtime: Any, concurrency: int, tokens: int, first: int = 0) -> dict[str, float]:
    from openmaas.entities.generation import SamplingParams

    loop = asyncio.get_running_loop()

    async def one(prompt: str) -> dict[str, Any]:
        started = time.perf_counter()
        request = runtime.generate(runtime.encode(prompt), SamplingParams(max_tokens=tokens, temperature=0.0), loop)
        arrivals: list[float] = []
        while True:
            event = await request.events.get()
            if event.text:
                arrivals.append(time.perf_counter())
            if event.finish_reason is not None:
                break
        return _stream_stats(started, arrivals)

    started = time.perf_counter()
    streams = await asyncio.gather(*[one(PROMPTS[(first + i) % len(PROMPTS)]) for i in range(concurrency)])
    return summarise(list(streams), time.perf_counter() - started)


def warm_up(base: str, key: str | None) -> None:
    """One short completion: the model loaded (and, for OpenMaaS, converted unless cached) before measuring."""
    httpx.post(
        f"{base}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"} if key else {},
        timeout=900,
    ).raise_for_status()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tokenizer_rss_mb(folder: Path) -> float:
    """What the model's tokenizer alone adds to a process (measured in a child: its memory is not the model's)."""
    code = (
        "import os, sys; from transformers import AutoTokenizer;"
        "r = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20;"
        f"b = r(); t = AutoTokenizer.from_pretrained({str(folder)!r}); print(r() - b)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def start_llama_cpp(python: str, gguf: Path, threads: int) -> tuple[subprocess.Popen[bytes], int] | None:
    if subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode != 0:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_threads",
         str(threads), "--n_ctx", "4096", "--model_alias", MODEL,
         # By default a new request interrupts the one streaming; queue them instead.
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # llama.cpp logs a lot: a pipe nobody reads would fill and stall it
    )  # fmt: skip
    if wait_until_ready(proc, f"http://127.0.0.1:{port}/v1/models", 120):
        return proc, port
    if proc.poll() is not None:
        print(f"llama.cpp server exited with {proc.returncode}", file=sys.stderr)
    else:
        proc.kill()
    return None


def markdown(
    results: dict[str, dict[int, dict[str, float]]],
    tokens: int,
    note: str,
    memory: dict[str, float] | None = None,
    rounds: int = 1,
) -> str:
    lines = [
        "",
        "## Text generation: gemma-3-270m (GGUF Q4_K_M)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()} by `bench/generation.py` "
        f"({tokens} tokens per stream, greedy; each figure the median of {rounds} rounds, one after another).",
        "",
        "| target | streams | tokens/s | vs 1 stream | TTFT p50 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for target, rows in results.items():
        one = rows.get(1, {}).get("tokens_per_s") or float("nan")
        for c, r in rows.items():
            lines.append(
                f"| {target} | {c} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one:.2f}x | "
                f"{r['ttft_p50_ms']:.0f} | {r['itl_p50_ms']:.0f} | {r['itl_p99_ms']:.0f} |"
            )
    ours = results.get("OpenMaaS (HTTP)")
    theirs = results.get("llama.cpp server")
    if ours and theirs:
        lines += [
            "",
            f"1 stream: OpenMaaS {ours[1]['tokens_per_s']:.1f} tokens/s = "
            f"**{ours[1]['tokens_per_s'] / theirs[1]['tokens_per_s']:.2f}x** llama.cpp's server (target >= 1.0x); "
            f"time to first token {ours[1]['ttft_p50_ms']:.0f} ms against {theirs[1]['ttft_p50_ms']:.0f} ms "
            "(target <=).",
            f"8 streams: **{ours[8]['tokens_per_s'] / theirs[8]['tokens_per_s']:.2f}x** llama.cpp's server at 8 "
            f"streams (target >= 3x) and **{ours[8]['tokens_per_s'] / ours[1]['tokens_per_s']:.2f}x** OpenMaaS's own "
            "1-stream figure (target >= 3x).",
        ]
    if memory:
        lines += [
            "",
            f"Memory: loading the int8 graph added **{memory['model_rss_mb']:.0f} MB** to the process without the "
            f"tokenizer = **{memory['model_rss_mb'] / memory['gguf_mb']:.2f}x** the GGUF file ({memory['gguf_mb']:.0f} "
            f"MB; target <= 1.5x); {memory['rss_mb']:.0f} MB with the tokenizer. ONNX Runtime packs the int8 blocks "
            f"into its own layout (the runtime counts {memory['weights_mb']:.0f} MB for its load); the graph's files "
            f"take {memory['int8_mb']:.0f} MB on disk, of which the float32 embedding table and the rotary tables "
            "are memory-mapped and only the rows read become resident.",
            f"Quality (the conversion's guard, on its fixed text and prompts): perplexity {memory['perplexity']:.3f} "
            f"against float32's {memory['perplexity_float32']:.3f} (**{memory['perplexity_increase']:+.2%}**, "
            f"limit +5%); greedy agreement with float32 over the first {memory['greedy_tokens']} tokens: "
            f"{memory['greedy_agreement']:.0%}.",
        ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure; the median round is reported")
    parser.add_argument("--append", type=Path, help="append the results as markdown to this file")
    parser.add_argument(
        "--llama-python", default=sys.executable, help="Python with llama-cpp-python[server] (default: this one)"
    )
    parser.add_argument("--data-dir", type=Path, help="server data folder (kept: the GGUF conversion is reused)")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    results: dict[str, dict[int, dict[str, float]]] = {}
    note = ""
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or Path(tmp) / "data"
        proc, port = start_server(data, KEY, {})
        base = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            warm_up(base, KEY)
            print(f"first load (GGUF conversion unless cached): {time.perf_counter() - started:.1f} s", flush=True)
            results["OpenMaaS (HTTP)"] = {}
            for c in CONCURRENCY:
                results["OpenMaaS (HTTP)"][c] = median_round(
                    partial(http_round, base, MODEL, c, args.tokens, KEY), args.rounds
                )
                print("http", c, json.dumps(results["OpenMaaS (HTTP)"][c]), flush=True)
            # Free the server's copy before loading the in-process one (same machine, same cores).
            httpx.post(f"{base}/v2/repository/models/{MODEL}/unload", headers={"Authorization": f"Bearer {KEY}"})
        finally:
            proc.terminate()
            proc.wait(30)
        converted = next((data / "artifacts" / "sha256").glob("*/converted"))
        gguf = converted.parent / "blob"

        # The libraries every model in a server shares are loaded before measuring: what a load adds is the model's.
        import onnxruntime  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from openmaas.runtimes import RuntimeOptions
        from openmaas.runtimes.causal_lm import CausalLMRuntime

        memory: dict[str, float] = {}
        for weights, label in (("int8", "in-process runtime (int8)"), ("float32", "in-process runtime (float32)")):
            before = rss_mb()
            runtime = CausalLMRuntime(converted, RuntimeOptions(torch_threads=threads, generation_weights=weights))
            runtime.load()
            if weights == "int8":
                record = runtime.weights
                tokenizer_mb = tokenizer_rss_mb(converted)
                memory = {
                    "rss_mb": rss_mb() - before,
                    "model_rss_mb": rss_mb() - before - tokenizer_mb,
                    "weights_mb": runtime.memory_bytes() / 2**20,
                    "gguf_mb": gguf.stat().st_size / 2**20,
                    "int8_mb": record["bytes"] / 2**20,
                    **{k: record[k] for k in ("perplexity", "perplexity_float32", "perplexity_increase")},
                    **{k: record[k] for k in ("greedy_agreement", "greedy_tokens")},
                }
                print("memory and quality", json.dumps(memory), flush=True)
            try:
                results[label] = {}
                for c in CONCURRENCY:
                    results[label][c] = median_round(partial(in_process_round, runtime, c, args.tokens), args.rounds)
                    print(label, c, json.dumps(results[label][c]), flush=True)
            finally:
                runtime.unload()

        started_llama = start_llama_cpp(args.llama_python, gguf, threads)
        if started_llama is None:
            note = (
                "llama.cpp's server was not measured in this run: llama-cpp-python is not installed here "
                "(`pip install 'llama-cpp-python[server]'` builds it from source)."
            )
        else:
            llama, lport = started_llama
            try:
                warm_up(f"http://127.0.0.1:{lport}", None)  # as the OpenMaaS server was, by its first load
                results["llama.cpp server"] = {}
                for c in CONCURRENCY:
                    results["llama.cpp server"][c] = median_round(
                        partial(http_round, f"http://127.0.0.1:{lport}", MODEL, c, args.tokens, None),
                        args.rounds,
                    )
                    print("llama.cpp", c, json.dumps(results["llama.cpp server"][c]), flush=True)
            finally:
                llama.terminate()
                llama.wait(30)
    text = markdown(results, args.tokens, note, memory, args.rounds)
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
