"""``recmesh.experiment.v1.ExperimentService`` over a loaded experiment book."""

from __future__ import annotations

from typing import Any

from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.assign import assign
from core.experiments.book import ExperimentBook
from core.validation import check_user_id
from mesh.context import current_tenant


class ExperimentServicer(experiment_pb2_grpc.ExperimentServiceServicer):
    """Deterministic assignment: the same tenant and attributes always get the same variants.

    Every answer carries the version of the book it came from (``book_version``), so a
    caller that caches answers can tell when the book changed.
    """

    def __init__(self, book: ExperimentBook) -> None:
        self._book = book

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
                )
                for a in assignments
                if a.in_experiment
            ],
            book_version=self._book.version,
        )
