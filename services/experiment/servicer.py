"""``recmesh.experiment.v1.ExperimentService`` over a loaded experiment book."""

from __future__ import annotations

from typing import Any

from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.assign import assign
from core.experiments.book import ExperimentBook
from core.validation import check_user_id
from mesh.context import current_tenant
from mesh.errors import InvalidArgument, NotFound
from services.experiment.report import ReportSpec
from services.experiment.reports import Reports


class ExperimentServicer(experiment_pb2_grpc.ExperimentServiceServicer):
    """Deterministic assignment: the same tenant and attributes always get the same variants.

    Every answer carries the version of the book it came from (``book_version``), so a
    caller that caches answers can tell when the book changed. Reports of an experiment
    (``GetReport``) are computed from the caller's tenant's event log by ``reports``.
    """

    def __init__(self, book: ExperimentBook, reports: Reports | None = None) -> None:
        self._book = book
        self._reports = reports if reports is not None else Reports("")

    async def Assign(
        self, request: experiment_pb2.AssignRequest, context: Any
    ) -> experiment_pb2.AssignResponse:
        check_user_id(request.user_id)
        attributes = {**request.attributes, "user_id": request.user_id}
        assignments = assign(self._book, tenant=current_tenant(), attributes=attributes)
        return experiment_pb2.AssignResponse(
            assignments=[
                experiment_pb2.Assignment(
                    experiment_key=a.experiment_key,
                    variant_key=a.variant_key,
                    variant_index=a.variant_index,
                    params=dict(a.params),
                    hash_value=a.hash_value,
                    arms=[
                        experiment_pb2.Arm(key=arm.key, params=dict(arm.params)) for arm in a.arms
                    ],
                )
                for a in assignments
                if a.in_experiment
            ],
            book_version=self._book.version,
        )

    async def GetReport(
        self, request: experiment_pb2.GetReportRequest, context: Any
    ) -> experiment_pb2.Report:
        """The report of one experiment the book declares for the caller's tenant (active
        or not), from that tenant's log.

        Raises:
            InvalidArgument: no ``experiment_key``, or an interleaving experiment (every
                user sees both arms: ``recmesh experiments interleaving`` reads it).
            NotFound: the book has no such experiment for the tenant.
            FailedPrecondition: the service has no Redis to read the log from.
        """
        tenant = current_tenant()
        key = request.experiment_key
        if not key:
            raise InvalidArgument("experiment_key is required", field="experiment_key")
        experiment = next((e for e in self._book.experiments if e.key == key), None)
        if experiment is None or not experiment.declared_for(tenant):
            raise NotFound(f"no experiment {key!r} for tenant {tenant!r}", field="experiment_key")
        if experiment.type == "interleave":
            raise InvalidArgument(
                f"{key!r} is an interleaving experiment (every user sees both arms): its "
                "result is `recmesh experiments interleaving`, not a report by variant",
                field="experiment_key",
            )
        return await self._reports.report(tenant, ReportSpec.of(experiment, self._book.version))
