"""The one error hierarchy of RecMesh.

Every domain error raised by a service or the gateway is a :class:`RecMeshError`.
Each class knows its gRPC status code and its HTTP status, so there is exactly one
place (:mod:`mesh.handling`, for every served call, and the gateway's HTTP layer)
that turns an error into a wire status. Handlers never build status codes by hand.
Errors of the Redis client that mean the store is out of reach (:func:`store_unavailable`)
are mapped there too, to UNAVAILABLE; any other exception is INTERNAL.
"""

from __future__ import annotations

import grpc
from redis import exceptions as redis_errors

MAX_MESSAGE_BYTES = 1024
"""Longest error message sent (UTF-8 bytes); a longer one is cut and ends with "...".
Messages quote request values (an id, a key), which can be megabytes long: gRPC carries
the message in a trailer (percent-encoded: up to 3 KiB for 1,024 bytes), and one over the
client's metadata limit (8 KiB soft, 16 KiB hard by default) replaces the status with the
client's own RESOURCE_EXHAUSTED."""


def clip_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` if its UTF-8 is at most ``limit`` bytes, else its head and "..."."""
    encoded = message.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return message
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


class RecMeshError(Exception):
    """Base of every domain error.

    Attributes:
        grpc_code: status code sent to gRPC callers.
        http_status: status code sent to HTTP callers.
        message: what went wrong, at most :data:`MAX_MESSAGE_BYTES` (clipped).
        field: for validation errors, the request field at fault (dotted path).
    """

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = clip_message(message)
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


# The store is out of reach, or (a Valkey Cluster) cannot serve the key's slot right now:
# transient, as a single server refusing connections is. Raised by redis-py after its own
# retries: ClusterError is "TTL exhausted" (MOVED/ASK/TRYAGAIN redirections that kept
# failing) and the base of ClusterDownError and MasterDownError. A CROSSSLOT error or any
# other ResponseError is a bug in the caller and stays INTERNAL.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.TryAgainError,
    redis_errors.AskError,  # and MovedError, its subclass
    redis_errors.SlotNotCoveredError,
)


def store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` from the Redis client means the store is unreachable (UNAVAILABLE).

    Besides :data:`STORE_UNAVAILABLE`: a cluster client that reached no node to refresh its
    topology raises a ``RedisClusterException`` caused by the connection error
    (``RedisClusterUnreachableError`` in recent redis-py; named by its cause here, so
    older clients' plain ``RedisClusterException`` counts too); other ``RedisClusterException``s
    (cross-slot commands, unsupported methods) are bugs.
    """
    if isinstance(exc, STORE_UNAVAILABLE):
        return True
    return isinstance(exc, redis_errors.RedisClusterException) and isinstance(
        exc.__cause__, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError
    )
