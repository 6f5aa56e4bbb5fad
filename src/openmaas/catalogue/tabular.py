"""Small scikit-learn models on bundled data sets: breast cancer (ONNX) and diabetes (skops)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openmaas.entities.models import ModelCard

SEED = 0


def breast_cancer_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    return train_test_split(  # type: ignore[no-any-return]
        x, data.target.astype(np.int64), test_size=0.25, random_state=SEED, stratify=data.target
    )


def diabetes_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    data = load_diabetes()
    return train_test_split(  # type: ignore[no-any-return]
        data.data.astype(np.float32), data.target.astype(np.float32), test_size=0.25, random_state=SEED
    )


def build_breast_cancer(workdir: Path) -> tuple[Path, ModelCard]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_tr, x_te, y_tr, y_te = breast_cancer_split()
    clf = LogisticRegression(max_iter=1000, random_state=SEED)
    pipe = make_pipeline(StandardScaler(), clf).fit(x_tr, y_tr)
    accuracy = float(accuracy_score(y_te, pipe.predict(x_te)))
    auc = float(roc_auc_score(y_te, pipe.predict_proba(x_te)[:, 1]))
    onx = convert_sklearn(
        pipe,
        initial_types=[("features", FloatTensorType([None, x_tr.shape[1]]))],
        options={id(clf): {"zipmap": False}},
        final_types=None,
        target_opset=17,
    )
    # skl2onnx names the outputs 'label' and 'probabilities' when zipmap is off.
    path = workdir / "breast-cancer-logreg.onnx"
    path.write_bytes(onx.SerializeToString())
    card = ModelCard(
        task="tabular-classification",
        description="Logistic regression with standardisation predicting whether a breast mass is malignant "
        "(0) or benign (1) from 30 features of a digitised fine-needle aspirate. Input 'features' FP32 [-1,30]; "
        "outputs 'probabilities' FP32 [-1,2] and 'label' INT64 [-1].",
        intended_use="Teaching and testing tabular classification serving. Not a medical device: never use it "
        "to make clinical decisions.",
        training_data=f"scikit-learn's Wisconsin diagnostic breast cancer data (569 cases), 75% for training "
        f"(stratified split, seed {SEED}); standardisation learned on the training split only.",
        metrics={"held_out_accuracy": round(accuracy, 4), "held_out_roc_auc": round(auc, 4)},
        limitations="Small, old, single-site data set; features must be computed exactly as in the original "
        "study, in the same order.",
        license="CC-BY-4.0 (data set); model Apache-2.0",
        privacy="Trained on a public, de-identified data set; requests are not stored.",
    )
    return path, card


def build_diabetes(workdir: Path) -> tuple[Path, ModelCard]:
    import skops.io as sio
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import mean_absolute_error, r2_score

    x_tr, x_te, y_tr, y_te = diabetes_split()
    model = LinearRegression().fit(x_tr, y_tr)
    pred = model.predict(x_te)
    path = workdir / "diabetes-linreg.skops"
    sio.dump(model, str(path))
    card = ModelCard(
        task="tabular-regression",
        description="Linear regression predicting disease progression one year after baseline from 10 "
        "standardised baseline variables (age, sex, BMI, blood pressure, six serum measurements). Input "
        "'features' FP32 [-1,10]; output 'prediction' FP32 [-1].",
        intended_use="Teaching and testing regression serving (served from a skops file). Not for clinical use.",
        training_data=f"scikit-learn's diabetes data set (442 patients), 75% for training (seed {SEED}).",
        metrics={
            "held_out_r2": round(float(r2_score(y_te, pred)), 4),
            "held_out_mae": round(float(mean_absolute_error(y_te, pred)), 2),
        },
        limitations="Linear model on a small data set; inputs must be scaled exactly like scikit-learn's "
        "copy of the data (mean-centred, scaled by standard deviation times the square root of n).",
        license="BSD-3-Clause (data set); model Apache-2.0",
        privacy="Trained on a public, de-identified data set; requests are not stored.",
    )
    return path, card
