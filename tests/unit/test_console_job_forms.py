"""The console's job forms: each type's fields become the API's job spec (empty fields left to its defaults)."""

from __future__ import annotations

import pytest

from openmaas.console.work import job_from_form
from openmaas.errors import InvalidRequest
from openmaas.jobs.specs import parse_spec


def test_each_form_makes_a_spec_the_api_accepts() -> None:
    forms = {
        "train": {"type": "train", "task": "tabular-classification", "dataset": "ds1", "target": "y",
                  "output_model": "mine", "epochs": "7"},
        "evaluate": {"type": "evaluate", "model": "wine", "version": "2", "dataset": "ds1", "task": "", "target": ""},
        "quantize": {"type": "quantize", "model": "wine", "version": "", "method": "static-int8",
                     "eval_dataset": "ds1", "calibration_dataset": "ds2", "max_metric_drop": "0.02",
                     "output_model": ""},
        "prune": {"type": "prune", "model": "digits-cnn", "dataset": "ds1", "sparsity": "0.5", "structured": "on",
                  "fine_tune_epochs": "3", "max_metric_drop": ""},
        "distill": {"type": "distill", "model": "wine", "version": "1", "dataset": "ds1", "student_hidden": "16, 8",
                    "epochs": "50", "output_model": "wine-small"},
    }  # fmt: skip
    specs = {kind: job_from_form(form) for kind, form in forms.items()}
    assert specs["train"] == {"type": "train", "task": "tabular-classification", "dataset": "ds1", "target": "y",
                              "output_model": "mine", "params": {"epochs": 7}}  # fmt: skip
    assert specs["evaluate"] == {"type": "evaluate", "model": "wine", "version": 2, "dataset": "ds1"}
    assert specs["quantize"] == {"type": "quantize", "model": "wine", "method": "static-int8", "eval_dataset": "ds1",
                                 "calibration_dataset": "ds2", "max_metric_drop": 0.02}  # fmt: skip
    assert specs["prune"] == {"type": "prune", "model": "digits-cnn", "dataset": "ds1", "sparsity": 0.5,
                              "fine_tune_epochs": 3, "structured": True}  # fmt: skip
    assert specs["distill"] == {"type": "distill", "teacher": "wine", "teacher_version": 1, "dataset": "ds1",
                                "epochs": 50, "output_model": "wine-small", "student": {"hidden": [16, 8]}}  # fmt: skip
    for spec in specs.values():
        parse_spec(spec)  # the API's own validation takes every one


def test_a_json_spec_wins_and_bad_fields_are_named() -> None:
    assert job_from_form({"type": "train", "spec": '{"type": "evaluate", "model": "m", "dataset": "d"}'}) == {
        "type": "evaluate", "model": "m", "dataset": "d"}  # fmt: skip
    cases = {
        "not valid JSON": {"spec": "{nope"},
        "must be a JSON object": {"spec": "[1]"},
        "type must be one of": {"type": "bake"},
        "'version' must be a whole number": {"type": "evaluate", "version": "1.5"},
        "'sparsity' must be a number": {"type": "prune", "sparsity": "half"},
        "'student_hidden' must be a whole number": {"type": "distill", "student_hidden": "32,wide"},
        "longer than": {"type": "train", "target": "x" * 20_001},
    }
    for wording, form in cases.items():
        with pytest.raises(InvalidRequest, match=wording):
            job_from_form(form)
