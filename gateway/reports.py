"""``GET /v1/experiments/{key}/report``: a tenant's experiment report, from the experiment
service, as JSON.

The experiment service computes the report from the tenant's event log
(``GetReport``, ``services/experiment/report.py``). The gateway answers 404 itself for an
experiment its copy of the book does not declare for the calling tenant, and maps the
service's NOT_FOUND to 404 too (its book may be newer). The call goes straight to the
experiment service's stub, outside that downstream's breaker and bulkhead: a report takes
seconds, and its timeouts must not open the breaker that guards assignment on the request
path.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.book import ExperimentBook
from mesh.client import Downstream, describe_failure
from mesh.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable


def report_json(report: experiment_pb2.Report) -> dict[str, Any]:
    """A report as JSON: proto3 JSON with the proto's field names, every field included
    (64-bit integers as strings, as proto3 JSON has them)."""
    rendered: dict[str, Any] = json_format.MessageToDict(
        report, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return rendered


class ExperimentReports:
    """Reports of the experiments ``book`` declares, from ``experiment``'s ``GetReport``
    with at most ``timeout_s`` per call."""

    def __init__(
        self,
        experiment: Downstream[experiment_pb2_grpc.ExperimentServiceAsyncStub],
        book: ExperimentBook,
        timeout_s: float,
    ) -> None:
        self._experiment = experiment
        self._book = book
        self._timeout_s = timeout_s

    def keys(self) -> list[str]:
        """The keys of the book's experiments (examples in the OpenAPI document)."""
        return [experiment.key for experiment in self._book.experiments]

    async def report(self, tenant: str, key: str) -> dict[str, Any]:
        """The report of experiment ``key`` for ``tenant`` (the tenant must be in the
        request context: it travels in the call's metadata), as JSON.

        Raises:
            NotFound: the book declares no experiment ``key`` for ``tenant``.
            InvalidArgument: ``key`` is an interleaving experiment (no report by variant).
            Unavailable: the experiment service failed or could not be reached.
        """
        declared = any(e.key == key and e.declared_for(tenant) for e in self._book.experiments)
        if not declared:
            raise NotFound(f"no experiment {key!r} for tenant {tenant!r}", field="key")
        try:
            reply: experiment_pb2.Report = await self._experiment.stub.GetReport(
                experiment_pb2.GetReportRequest(experiment_key=key), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"no experiment {key!r} for tenant {tenant!r}", field="key") from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(exc.details() or "invalid", field="key") from exc
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise ResourceExhausted(
                    exc.details() or "too many reports at once", retry_after_s=5.0
                ) from exc
            raise Unavailable(f"the report failed: {describe_failure(exc)}") from exc
        return report_json(reply)
