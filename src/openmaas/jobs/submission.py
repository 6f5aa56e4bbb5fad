"""Submitting a job: parse its spec, refuse at once what would fail it, and queue it.

The checks read the dataset and run the same data preparation the job will (``training.data``: pure checks over
arrays, no model is built or trained here), so a wrong target column or a one-row class is a 400 naming it now
instead of a failed job minutes later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from openmaas.datasets.service import DatasetService
from openmaas.entities.models import ModelVersion
from openmaas.errors import InvalidRequest
from openmaas.jobs.service import JobService
from openmaas.jobs.specs import DistillSpec, EvaluateSpec, PruneSpec, QuantizeSpec, TrainSpec, parse_spec
from openmaas.registry.service import ModelRegistry, full_name_for
from openmaas.runtimes import runtime_class
from openmaas.training import data as training_data


class JobSubmission:
    """``submit`` for every job type; the checks of each type live here, beside the spec they check."""

    def __init__(self, jobs: JobService, datasets: DatasetService, registry: ModelRegistry) -> None:
        self._jobs = jobs
        self._datasets = datasets
        self._registry = registry

    async def submit(
        self,
        body: dict[str, Any],
        *,
        org_id: str | None,
        namespace: str | None = None,
        key_id: str | None,
        by_admin: bool,
        model_version: Callable[..., ModelVersion],
    ) -> dict[str, Any]:
        """Check and queue the job ``body``; ``model_version(name, version=None)`` resolves a model the submitter
        may see (404 otherwise). A trained model is named in the submitter's ``namespace`` (its organisation's)."""
        spec = parse_spec(body)
        if isinstance(spec, TrainSpec):
            spec = spec.model_copy(update={"output_model": full_name_for(spec.output_model, namespace, "output_model")})
            await asyncio.to_thread(self.check_train, spec, org_id, by_admin, model_version)
        elif isinstance(spec, EvaluateSpec):
            spec = await asyncio.to_thread(self.check_evaluate, spec, org_id, by_admin, model_version)
        elif isinstance(spec, QuantizeSpec):
            spec = await asyncio.to_thread(self.check_quantize, spec, org_id, namespace, by_admin, model_version)
        elif isinstance(spec, PruneSpec | DistillSpec):
            spec = await asyncio.to_thread(self.check_network, spec, org_id, namespace, by_admin, model_version)
        return await asyncio.to_thread(self._jobs.create, org_id, key_id, spec.model_dump(mode="json"))

    def check_evaluate(
        self, spec: EvaluateSpec, org_id: str | None, by_admin: bool, model_version: Callable[..., ModelVersion]
    ) -> EvaluateSpec:
        """The version (resolved now: a later version does not change what is measured), the dataset, and the
        whole plan of inputs and truth the job will build; returns the spec with the full name and version."""
        from openmaas.jobs import evaluate

        mv = model_version(spec.model, spec.version)
        reference = model_version(mv.model, spec.reference_version) if spec.reference_version else None
        ds = self._datasets.get(org_id, spec.dataset, any_org=by_admin)
        served_as = runtime_class(mv.format).serves
        evaluate.plan(spec, mv, served_as, evaluate.load_data(self._datasets, ds), reference)
        return spec.model_copy(update={"model": mv.model, "version": mv.version})

    def check_quantize(
        self,
        spec: QuantizeSpec,
        org_id: str | None,
        namespace: str | None,
        by_admin: bool,
        model_version: Callable[..., ModelVersion],
    ) -> QuantizeSpec:
        """A format the method quantises, the datasets it reads (calibration rows that fit the model's inputs), and
        where the result goes: a new version of a model the submitter owns, else a model in its namespace."""
        from openmaas.jobs import compress

        mv = model_version(spec.model, spec.version)
        compress.prepare(spec, mv, self._datasets, org_id, by_admin)
        owner = self._registry.get_model(mv.model).owner_org_id
        output = compress.output_name(spec, mv, owner, org_id, namespace, by_admin)
        taken = output is not None and self._registry.exists(output)
        if taken and self._registry.get_model(str(output)).owner_org_id != org_id:
            raise InvalidRequest(f"model name '{output}' is taken; choose another", param="output_model")
        return spec.model_copy(update={"model": mv.model, "version": mv.version, "output_model": output})

    def check_network(
        self,
        spec: PruneSpec | DistillSpec,
        org_id: str | None,
        namespace: str | None,
        by_admin: bool,
        model_version: Callable[..., ModelVersion],
    ) -> PruneSpec | DistillSpec:
        """Pruning and distillation: an ONNX classifier whose graph reads back, a labelled dataset that fits it, a
        student with the teacher's classes, and where the result goes."""
        from openmaas.jobs import compress

        if isinstance(spec, PruneSpec):
            mv = model_version(spec.model, spec.version)
        else:
            mv = model_version(spec.teacher, spec.teacher_version)
            if spec.classes and mv.card.classes and list(spec.classes) != list(mv.card.classes):
                raise InvalidRequest(
                    f"the student's classes ({', '.join(spec.classes[:10])}) are not the teacher's "
                    f"({', '.join(mv.card.classes[:10])}): a student learns its teacher's label set",
                    param="classes",
                )
        artifact = self._registry.artifact_path(mv)
        if isinstance(spec, DistillSpec) and compress.is_encoder(mv):
            compress.prepare_encoder_distillation(spec, mv, artifact, self._datasets, org_id, by_admin)
        else:
            compress.prepare_network(spec, mv, artifact, self._datasets, org_id, by_admin)
        owner = self._registry.get_model(mv.model).owner_org_id
        suffix = "pruned" if isinstance(spec, PruneSpec) else "distilled"
        output = compress.output_name(spec, mv, owner, org_id, namespace, by_admin, suffix)
        taken = output is not None and self._registry.exists(output)
        if taken and self._registry.get_model(str(output)).owner_org_id != org_id:
            raise InvalidRequest(f"model name '{output}' is taken; choose another", param="output_model")
        named = {"model": mv.model, "version": mv.version} if isinstance(spec, PruneSpec) else {
            "teacher": mv.model, "teacher_version": mv.version}  # fmt: skip
        return spec.model_copy(update={**named, "output_model": output})

    def check_train(
        self, spec: TrainSpec, org_id: str | None, by_admin: bool, model_version: Callable[[str], ModelVersion]
    ) -> None:
        """Refuse what would fail the job: unknown dataset, target or model name, bad classes, a wrong encoder."""
        ds = self._datasets.get(org_id, spec.dataset, any_org=by_admin)
        if spec.task == "text-classification":
            encoder = model_version(spec.encoder)  # 404 when the submitter cannot see it
            if runtime_class(encoder.format).serves != "embedding":
                raise InvalidRequest(f"encoder '{spec.encoder}' is not a text-embedding model", param="encoder")
            training_data.prepare_text(self._datasets.table(ds), spec.text_column, spec.target)
        elif spec.task == "image-classification":
            training_data.prepare_images(self._datasets.images(ds))
        else:
            training_data.prepare(self._datasets.table(ds), spec.target, spec.kind)
        if self._registry.exists(spec.output_model):
            owner = self._registry.get_model(spec.output_model).owner_org_id
            if owner != org_id:
                raise InvalidRequest(f"model name '{spec.output_model}' is taken; choose another", param="output_model")
