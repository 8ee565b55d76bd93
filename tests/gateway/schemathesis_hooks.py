"""Schemathesis hooks of the gateway's fuzz (``tests/gateway/test_schemathesis.py`` loads
them with ``SCHEMATHESIS_HOOKS=tests.gateway.schemathesis_hooks``).

They leave out the one difference between the OpenAPI document and the server that JSON
Schema cannot avoid (``gateway/jsonmodel.py``): a string limited in bytes of UTF-8 carries
``maxLength`` equal to the byte limit, so a string of at most that many characters but more
bytes is allowed by the document and refused (400) by the server. Generated requests that
hold one are skipped; every other generated request is sent.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from core.catalog import MAX_ATTRIBUTE_BYTES, MAX_ID_BYTES
from core.events import MAX_REQUEST_ID_BYTES

BYTE_LIMITS = sorted({MAX_ID_BYTES, MAX_ATTRIBUTE_BYTES, MAX_REQUEST_ID_BYTES})
"""Every limit in bytes of a string of the API."""


def in_byte_gap(text: str) -> bool:
    """Whether ``text`` is within a byte limit by characters and over it by bytes."""
    size = len(text.encode("utf-8", "surrogatepass"))
    return any(len(text) <= limit < size for limit in BYTE_LIMITS)


def holds_byte_gap(value: Any) -> bool:
    """Whether a decoded JSON ``value`` holds such a string, as a value or an object key."""
    if isinstance(value, str):
        return in_byte_gap(value)
    if isinstance(value, dict):
        return any(holds_byte_gap(k) or holds_byte_gap(v) for k, v in value.items())
    if isinstance(value, list):
        return any(holds_byte_gap(v) for v in value)
    return False


@schemathesis.hook
def filter_body(context: schemathesis.HookContext, body: Any) -> bool:
    return not holds_byte_gap(body)


@schemathesis.hook
def filter_path_parameters(context: schemathesis.HookContext, path_parameters: Any) -> bool:
    return not holds_byte_gap(path_parameters)
