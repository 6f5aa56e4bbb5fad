"""Quantisation benchmark: all-MiniLM-L6-v2 dynamic int8 against the torch fp32 model, in one run.

    python bench/compression.py [--duration 8] [--append docs/benchmarks.md]

1. The platform's own code quantises the bundled model (``compression.quantize``: export to ONNX, then ONNX
   Runtime's dynamic int8 of the MatMul and Gather weights); file sizes are compared.
2. Fidelity: cosine between fp32 and int8 embeddings of the 600 built-in English sentences.
3. In process: rows a second at batch 32 of the torch fp32 runtime and the int8 ONNX runtime (the classes the
   server serves them with), the same threads, alternating rounds.
4. Served: a real ``openmaas serve`` with both registered; ``/v1/embeddings`` with 64 clients in flight (the
   closed-loop load generator of ``bench/serving.py``), alternating between the models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import http_request, machine, start_server
from loadgen import run_load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

KEY = "om_bench-key-0123456789abcdefghijklmnopqrstuvwxyz"
TARGETS = {"smaller": 3.5, "in_process": 1.8, "served": 1.5, "cosine_mean": 0.985, "cosine_min": 0.95}


def _rows_per_s(runtime: object, texts: list[str], seconds: float) -> float:
    batch = np.array([t.encode() for t in texts[:32]], dtype=object)
    runtime.infer({"text": batch})  # type: ignore[attr-defined]
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        lo = (calls * 32) % (len(texts) - 32)
        runtime.infer({"text": np.array([t.encode() for t in texts[lo : lo + 32]], dtype=object)})  # type: ignore[attr-defined]
        calls += 1
    return calls * 32 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds a measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()

    from openmaas.catalogue.minilm import model_dir
    from openmaas.compression.quantize import export_encoder, quantize_dynamic_folder
    from openmaas.evaluation.metrics import fidelity
    from openmaas.evaluation.sentences import english_sentences
    from openmaas.runtimes import RuntimeOptions
    from openmaas.runtimes.onnx_embedding import OnnxEmbeddingRuntime
    from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime

    print(f"machine: {machine()}", flush=True)
    texts = english_sentences()
    work = Path(tempfile.mkdtemp(prefix="openmaas-bench-q-"))
    source = model_dir()
    export_encoder(source, work / "fp32")
    quantize_dynamic_folder(work / "fp32", work / "int8")
    sizes = {
        "torch fp32 (safetensors)": (source / "model.safetensors").stat().st_size,
        "ONNX fp32": (work / "fp32" / "model.onnx").stat().st_size,
        "ONNX int8": (work / "int8" / "model.onnx").stat().st_size,
    }
    smaller = sizes["torch fp32 (safetensors)"] / sizes["ONNX int8"]
    print(json.dumps({"sizes": sizes, "smaller": smaller}), flush=True)

    options = RuntimeOptions(torch_threads=args.threads, onnx_threads=args.threads)
    fp32 = SentenceTransformerRuntime(source, options)
    int8 = OnnxEmbeddingRuntime(work / "int8", options)
    fp32.load()
    int8.load()
    a, _ = fp32.embed(texts)
    b, _ = int8.embed(texts)
    faithful = fidelity(b, a)
    print(json.dumps(faithful), flush=True)
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(args.rounds):
        rates["fp32"].append(_rows_per_s(fp32, texts, args.duration / 2))
        rates["int8"].append(_rows_per_s(int8, texts, args.duration / 2))
    in_process = {k: float(np.median(v)) for k, v in rates.items()}
    print(json.dumps({"in_process_rows_per_s": in_process}), flush=True)
    fp32.unload()
    int8.unload()

    import httpx

    served: dict[str, list[float]] = {"fp32": [], "int8": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(Path(tmp) / "data", KEY, {})
        try:
            url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
            import shutil
            import zipfile

            archive = Path(tmp) / "int8.zip"
            with zipfile.ZipFile(archive, "w") as z:
                for p in (work / "int8").iterdir():
                    z.write(p, p.name)
            with archive.open("rb") as f:
                httpx.post(f"{url}/api/models", headers=auth, data={"name": "minilm-int8"},
                           files={"file": ("int8.zip", f)}, timeout=300).raise_for_status()  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
            names = {"fp32": "all-minilm-l6-v2", "int8": "minilm-int8"}
            for model in names.values():
                httpx.post(f"{url}/v2/repository/models/{model}/load", headers=auth, timeout=300).raise_for_status()
            requests = {
                k: [http_request("/v1/embeddings", json.dumps({"model": m, "input": t}).encode(), KEY) for t in texts]
                for k, m in names.items()
            }
            for _ in range(args.rounds):
                for k in ("fp32", "int8"):
                    r = run_load(port, requests[k], args.concurrency, 2.0, args.duration)
                    served[k].append(r["rps"])
                    print(json.dumps({k: r}), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    served_rps = {k: float(np.median(v)) for k, v in served.items()}
    figures = {
        "smaller": smaller,
        "in_process": in_process["int8"] / in_process["fp32"],
        "served": served_rps["int8"] / served_rps["fp32"],
        "cosine_mean": faithful["cosine_mean"],
        "cosine_min": faithful["cosine_min"],
    }
    report = render(machine(), sizes, faithful, in_process, served_rps, figures, args)
    print()
    print(report)
    if args.append:
        with args.append.open("a") as f:
            f.write(report)


def render(
    where: str,
    sizes: dict[str, int],
    faithful: dict[str, float],
    in_process: dict[str, float],
    served: dict[str, float],
    figures: dict[str, float],
    args: argparse.Namespace,
) -> str:
    def mark(name: str) -> str:
        return "meets" if figures[name] >= TARGETS[name] else "**misses**"

    lines = [
        "",
        "## Quantisation: all-MiniLM-L6-v2 dynamic int8",
        "",
        f"Measured by `bench/compression.py` on {where}; medians of {args.rounds} alternating rounds, "
        f"{args.duration:g} s each, {args.threads} threads.",
        "",
        "| figure | fp32 | int8 | ratio | target |",
        "|---|---|---|---|---|",
        f"| file size | {sizes['torch fp32 (safetensors)'] / 1e6:.1f} MB (safetensors; ONNX fp32 "
        f"{sizes['ONNX fp32'] / 1e6:.1f} MB) | {sizes['ONNX int8'] / 1e6:.1f} MB | {figures['smaller']:.2f}x smaller "
        f"| >= {TARGETS['smaller']}x: {mark('smaller')} |",
        f"| in-process rows/s at batch 32 | {in_process['fp32']:.0f} (torch) | {in_process['int8']:.0f} (ONNX Runtime) "
        f"| {figures['in_process']:.2f}x | >= {TARGETS['in_process']}x: {mark('in_process')} |",
        f"| served `/v1/embeddings` req/s, {args.concurrency} clients | {served['fp32']:.0f} | {served['int8']:.0f} "
        f"| {figures['served']:.2f}x | >= {TARGETS['served']}x: {mark('served')} |",
        f"| cosine to fp32 over 600 English sentences | | mean {faithful['cosine_mean']:.4f}, p5 "
        f"{faithful['cosine_p5']:.4f}, min {faithful['cosine_min']:.4f} | | mean >= {TARGETS['cosine_mean']}: "
        f"{mark('cosine_mean')}; min >= {TARGETS['cosine_min']}: {mark('cosine_min')} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
