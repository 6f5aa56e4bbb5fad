"""scikit-learn estimators stored with skops (no pickle): classifiers and regressors on numeric features."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.runtimes.base import Runtime, RuntimeResult


class SkopsRuntime(Runtime):
    """Input ``features`` FP32 [-1, n]; outputs ``probabilities`` + ``label`` (classifiers) or ``prediction``."""

    format = "skops"
    platform = "sklearn_skops"
    # skops imports every scikit-learn estimator module to list the types it trusts: 3-6 s on 2 cores, ~170 MB.
    libraries = ("skops.io",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._estimator: Any = None
        self._signature: Signature | None = None

    def load(self) -> None:
        import skops.io as sio

        # trusted=None: only the types skops trusts by default; anything else raises instead of running.
        estimator = sio.load(str(self.path), trusted=None)
        n_features = getattr(estimator, "n_features_in_", None)
        if n_features is None:
            raise ValueError("the skops file holds an estimator that has not been fitted (no n_features_in_)")
        inputs = [TensorSpec(name="features", datatype="FP32", shape=[-1, int(n_features)])]
        classes = getattr(estimator, "classes_", None)
        if classes is not None and hasattr(estimator, "predict_proba"):
            label_type = "INT64" if np.asarray(classes).dtype.kind in "iub" else "BYTES"
            outputs = [
                TensorSpec(name="probabilities", datatype="FP32", shape=[-1, len(classes)]),
                TensorSpec(name="label", datatype=label_type, shape=[-1]),  # type: ignore[arg-type]
            ]
        else:
            outputs = [TensorSpec(name="prediction", datatype="FP32", shape=[-1])]
        self._signature = Signature(inputs=inputs, outputs=outputs)
        self._estimator = estimator

    @property
    def signature(self) -> Signature:
        if self._signature is None:
            raise RuntimeError("skops model is not loaded")
        return self._signature

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        est = self._estimator
        if est is None:
            raise RuntimeError("skops model is not loaded")
        x = np.asarray(batch["features"], dtype=np.float32)
        if self.signature.output("prediction") is not None:
            return RuntimeResult(outputs={"prediction": np.asarray(est.predict(x), dtype=np.float32).reshape(-1)})
        proba = np.asarray(est.predict_proba(x), dtype=np.float32)
        labels = np.asarray(est.classes_)[proba.argmax(axis=1)]
        if labels.dtype.kind in "iub":
            labels = labels.astype(np.int64)
        else:
            labels = np.array([str(v).encode() for v in labels], dtype=object)
        return RuntimeResult(outputs={"probabilities": proba, "label": labels})

    def memory_bytes(self) -> int:
        return self.path.stat().st_size

    def parameters(self) -> int | None:
        """Numbers the fitted estimator predicts with (weights, intercepts, scalers' statistics, support vectors,
        tree nodes), through pipelines and ensembles; diagnostics such as ``singular_`` are not parameters."""
        return _parameters(self._estimator, 0) if self._estimator is not None else None

    def unload(self) -> None:
        self._estimator = None


# Fitted attributes that predictions are computed from.
_WEIGHTS = frozenset(
    {"coef_", "intercept_", "coefs_", "intercepts_", "mean_", "scale_", "components_", "cluster_centers_",
     "support_vectors_", "dual_coef_", "theta_", "feature_log_prob_", "class_log_prior_", "min_", "center_"}
)  # fmt: skip


def _parameters(obj: Any, depth: int) -> int:
    if depth > 5 or obj is None:
        return 0
    if isinstance(obj, np.ndarray):
        return int(obj.size) if obj.dtype.kind in "fiu" else sum(_parameters(o, depth + 1) for o in obj.flat)
    if isinstance(obj, float | int | np.number) and not isinstance(obj, bool):
        return 1
    if isinstance(obj, list | tuple):
        return sum(_parameters(o, depth + 1) for o in obj)
    if hasattr(obj, "node_count") and hasattr(obj, "threshold"):  # a fitted tree: a threshold and values a node
        return int(obj.node_count) * (2 + int(np.prod(obj.value.shape[1:])))
    if not hasattr(obj, "get_params"):
        return 0
    total = 0
    for name, value in vars(obj).items():
        if name in _WEIGHTS:
            total += _parameters(value, depth + 1)
        elif name in ("steps", "estimators_", "tree_", "transformers_", "estimator_"):
            parts = [v[1] if isinstance(v, tuple) else v for v in (value if isinstance(value, list) else [value])]
            total += sum(_parameters(v, depth + 1) for v in parts)
    return total
