"""Compressing the digits CNN: static int8, 80% unstructured pruning, structured pruning and distillation, each
against the teacher on its own held-out quarter, with the platform's compression code, in one run.

    python bench/compression_digits.py [--seeds 5] [--append docs/benchmarks.md]

The teacher is built as the catalogue builds it at first start (``catalogue/digits.py``). Pruning fine-tunes and
distillation trains with the jobs' training loop on the teacher's training rows (a validation share of them
picks the epoch); accuracy is measured on the held-out quarter only. Speed is ONNX Runtime's rows a second at
batch 32 on one thread, the two graphs alternating.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float((_session(path).run(None, {"image": x})[0].argmax(axis=1) == y).mean())


def _rows_per_s(paths: list[Path], x: np.ndarray, seconds: float, rounds: int = 3) -> list[float]:
    sessions = [_session(p) for p in paths]
    batch = x[:32]
    best = [0.0] * len(paths)
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            s.run(None, {"image": batch})
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                s.run(None, {"image": batch})
                calls += 1
            best[i] = max(best[i], calls * 32 / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()

    import torch
    from sklearn.model_selection import train_test_split

    from openmaas.catalogue import digits
    from openmaas.compression import networks
    from openmaas.compression.quantize import quantize_static_file
    from openmaas.training import loop
    from openmaas.training.export import export_onnx
    from openmaas.training.optim import TrainParams

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="openmaas-bench-digits-"))
    teacher_path, _ = digits.build(work)
    x_tr, x_te, y_tr, y_te = digits.held_out_split()
    fit, val = train_test_split(np.arange(len(x_tr)), test_size=0.15, random_state=42, stratify=y_tr)
    data = {"train": (x_tr[fit], y_tr[fit]), "val": (x_tr[val], y_tr[val])}
    teacher_acc = _accuracy(teacher_path, x_te, y_te)
    example = torch.from_numpy(x_tr[:2])
    teacher_flops, teacher_params = networks.flops_and_parameters(
        networks.from_onnx(teacher_path.read_bytes()), example
    )
    print(f"teacher: held-out accuracy {teacher_acc:.4f}, {teacher_params} parameters", flush=True)

    def tune(build, epochs: int, lr: float, soft=None, seed: int = 42, patience: int = 5):  # type: ignore[no-untyped-def]
        params = TrainParams(epochs=epochs, learning_rate=lr, seed=seed, monitor="val_metric", patience=patience)
        with tempfile.TemporaryDirectory() as tmp:
            model = loop.train(data, params, "classification", 10, Path(tmp) / "c.pt", lambda r: None, build,
                               soft_targets=soft)  # fmt: skip
        return model.eval()

    rows: list[tuple[str, str, float, str]] = []
    # static int8
    int8 = work / "int8.onnx"
    quantize_static_file(teacher_path, int8, {"image": x_tr[:200]})
    acc = _accuracy(int8, x_te, y_te)
    rows.append(("static int8 (QDQ)", f"{teacher_path.stat().st_size / int8.stat().st_size:.2f}x smaller file",
                 acc, "within 0.5 points"))  # fmt: skip
    print(rows[-1], flush=True)

    # 80% unstructured
    def unstructured() -> networks.Classifier:
        m = networks.from_onnx(teacher_path.read_bytes())
        networks.prune_unstructured(m, 0.8)
        return m

    model = tune(unstructured, 20, 0.001)
    networks.finish_unstructured(model)
    sparse = work / "sparse.onnx"
    export_onnx(model, (1, 8, 8), "classification", sparse, "image")
    acc = _accuracy(sparse, x_te, y_te)
    gz = networks.gzip_size(sparse.read_bytes()) / networks.gzip_size(teacher_path.read_bytes())
    rows.append(("80% unstructured + 20 epochs", f"{networks.sparsity_of(model):.0%} zeros; gzip {gz:.2f}x the size",
                 acc, "within 0.5 points"))  # fmt: skip
    print(rows[-1], flush=True)

    # structured 50% of channels
    def structured() -> networks.Classifier:
        m = networks.from_onnx(teacher_path.read_bytes())
        networks.prune_structured(m, 0.5, example)
        return m

    model = tune(structured, 20, 0.001)
    flops, _ = networks.flops_and_parameters(model, example)
    slim = work / "slim.onnx"
    export_onnx(model, (1, 8, 8), "classification", slim, "image")
    acc = _accuracy(slim, x_te, y_te)
    speed = _rows_per_s([teacher_path, slim], x_te, 1.0)
    rows.append(("structured, 50% of channels + 20 epochs",
                 f"{teacher_flops / flops:.2f}x fewer FLOPs, {speed[1] / speed[0]:.2f}x rows/s at batch 32",
                 acc, ">= 2x fewer FLOPs, >= 1.5x faster, within 1 point"))  # fmt: skip
    print(rows[-1], flush=True)

    # distillation, several seeds
    teacher = _session(teacher_path)
    soft = teacher.run(None, {"image": x_tr[fit]})[0]
    accs = []
    for seed in range(args.seeds):
        student = tune(lambda: networks.student((1, 8, 8), 10, {"channels": [8, 16]}, x_tr[fit]), 200, 0.003,
                       (soft, 4.0, 0.9), seed=seed, patience=40)  # fmt: skip
        path = work / f"student{seed}.onnx"
        export_onnx(student, (1, 8, 8), "classification", path, "image")
        accs.append(_accuracy(path, x_te, y_te))
        print(f"student seed {seed}: {accs[-1]:.4f}", flush=True)
    ratio = teacher_params / networks.parameters(student)
    rows.append((f"distilled CNN student (channels 8, 16), mean of {args.seeds} seeds",
                 f"{ratio:.1f}x fewer parameters; accuracies {', '.join(f'{a:.4f}' for a in accs)}",
                 float(np.mean(accs)), ">= 10x fewer parameters, within 1 point"))  # fmt: skip

    lines = [
        "",
        "## Compressing the digits CNN",
        "",
        f"Measured by `bench/compression_digits.py` on {machine()}: the teacher as the catalogue builds it, "
        f"held-out accuracy {teacher_acc:.4f} on its own held-out quarter ({len(y_te)} images), {teacher_params:,} "
        "parameters; every figure below on the same quarter.",
        "",
        "| result | what it is | held-out accuracy | points from the teacher | target |",
        "|---|---|---|---|---|",
    ]
    for name, what, acc, target in rows:
        lines.append(f"| {name} | {what} | {acc:.4f} | {100 * (acc - teacher_acc):+.2f} | {target} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.append:
        with args.append.open("a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
