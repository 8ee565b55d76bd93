"""Request checks shared by the services (the field named in every error)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from recmesh.common.v1 import common_pb2

from core.catalog import MAX_ID_BYTES
from mesh.errors import InvalidArgument

MAX_USER_ID_BYTES = MAX_ID_BYTES


def check_user_id(user_id: str, field: str = "user_id") -> str:
    """``user_id`` if it is 1..128 bytes of UTF-8 (a tenant's own id, ``core.catalog``).

    Raises:
        InvalidArgument: empty or too long.
    """
    if not user_id:
        raise InvalidArgument(f"{field} is required", field=field)
    if len(user_id.encode()) > MAX_USER_ID_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_USER_ID_BYTES} bytes", field=field)
    return user_id


def vector_from_bytes(raw: bytes, dim: int, field: str) -> npt.NDArray[np.float32]:
    """A float32 vector of exactly ``dim`` values packed little-endian in ``raw``.

    Raises:
        InvalidArgument: the byte length does not match ``dim``.
    """
    if len(raw) != dim * 4:
        raise InvalidArgument(f"{field} must hold {dim} float32 values", field=field)
    return np.frombuffer(raw, dtype="<f4")


def matrix_from_proto(
    matrix: common_pb2.FeatureMatrix, rows: int, field: str
) -> npt.NDArray[np.float32]:
    """The ``[rows, dim]`` float32 array a :class:`FeatureMatrix` holds.

    Raises:
        InvalidArgument: the row count or byte length disagrees with the declared shape.
    """
    if matrix.rows != rows:
        raise InvalidArgument(f"{field}.rows must be {rows}, got {matrix.rows}", field=field)
    if matrix.dim <= 0 or len(matrix.values) != matrix.rows * matrix.dim * 4:
        raise InvalidArgument(
            f"{field}.values must hold rows*dim float32 values", field=f"{field}.values"
        )
    return np.frombuffer(matrix.values, dtype="<f4").reshape(matrix.rows, matrix.dim)


def matrix_to_proto(rows: npt.NDArray[np.float32]) -> common_pb2.FeatureMatrix:
    """``rows`` (``[n, dim]``) as a :class:`FeatureMatrix` (float32 little-endian)."""
    return common_pb2.FeatureMatrix(
        rows=rows.shape[0], dim=rows.shape[1], values=rows.astype("<f4").tobytes()
    )
