"""The one error hierarchy of RecMesh.

Every domain error raised by a service or the gateway is a :class:`RecMeshError`.
Each class knows its gRPC status code and its HTTP status, so there is exactly one
place (the server interceptor in :mod:`mesh.server` and the gateway's HTTP layer)
that turns an error into a wire status. Handlers never build status codes by hand.
"""

from __future__ import annotations

import grpc


class RecMeshError(Exception):
    """Base of every domain error.

    Attributes:
        grpc_code: status code sent to gRPC callers.
        http_status: status code sent to HTTP callers.
        field: for validation errors, the request field at fault (dotted path).
    """

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        """The JSON error body: ``{"error": code name, "message": ..., "field": ...}``."""
        body = {"error": self.grpc_code.name, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidArgument(RecMeshError):
    """The request is malformed or a field is out of range; ``field`` names it."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class Unauthenticated(RecMeshError):
    """No credentials, or credentials that match no tenant (an API key); or a call naming a
    tenant over a connection whose certificate names no identity (``mesh.identity``)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(RecMeshError):
    """Valid credentials asking for something they may not do: their tenant may not touch
    it, or their certificate's identity may not name a tenant to this service
    (``mesh.identity``)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class NotFound(RecMeshError):
    """The named entity does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class ResourceExhausted(RecMeshError):
    """Over quota. ``retry_after_s`` tells the caller when to come back."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FailedPrecondition(RecMeshError):
    """The system is not in a state to serve this (e.g. no artifacts loaded)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 503


class Unavailable(RecMeshError):
    """A dependency is down and no useful answer can be produced."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Overloaded(Unavailable):
    """Refused at admission: the process is over capacity. ``retry_after_s`` tells the
    caller when to come back (HTTP ``Retry-After``, gRPC trailer ``retry-after``)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RecMeshError):
    """The request's budget ran out before an answer was ready."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class ConfigError(RecMeshError):
    """A configuration file or setting is invalid; raised at start-up, never per request."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 500


class ArtifactError(RecMeshError):
    """An artifact set is missing, partial or corrupt. The message names the file."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 503
