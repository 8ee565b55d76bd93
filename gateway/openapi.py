"""The OpenAPI 3.1 document served on ``GET /openapi.json``, emitted from the models the
server checks requests with (:mod:`gateway.schema`): its component schemas are those
models' JSON Schemas, with the run-time bounds (``params``) the server applies now.

Every status code a route can answer is listed (a 500 is a bug, never documented).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.jsonmodel import Params, Str
from gateway.schema import COMPONENTS, ID, ITEMS_REQUEST

_ERROR_TEXT = {
    400: "invalid request; `field` names what is at fault",
    401: "missing or unknown x-api-key (or a revoked or expired key)",
    403: "the key lacks the scope this route needs",
    404: "no such experiment for the calling tenant",
    408: "the request body did not arrive in time (the connection is closed)",
    413: "body larger than the gateway's limit (RECMESH_GATEWAY_MAX_BODY_BYTES)",
    429: "over quota, or too many entries waiting for delivery: retry after Retry-After",
    503: "no useful answer can be produced (retry later); with a Retry-After header, the "
    "gateway is over capacity and refused the request before any work",
}

_RETRY_AFTER = {
    "description": "seconds to wait before retrying",
    "schema": {"type": "integer", "minimum": 1},
}


def _json(schema: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        **extra,
    }


def _errors(*codes: int) -> dict[str, Any]:
    responses = {}
    for code in codes:
        extra: dict[str, Any] = {}
        if code == 429:
            extra["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}
        if code == 503:
            extra["headers"] = {"Retry-After": _RETRY_AFTER}
        responses[str(code)] = _json("Error", _ERROR_TEXT[code], **extra)
    return responses


def _body(schema: str, example: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{schema}"}}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}}


def _path_parameter(
    name: str, schema: dict[str, Any], description: str, examples: Sequence[str] = ()
) -> dict[str, Any]:
    parameter: dict[str, Any] = {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }
    if examples:
        parameter["examples"] = {value: {"value": value} for value in examples}
    return parameter


def openapi_document(params: Params, experiment_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI document of the HTTP API with the run-time bounds ``params``
    (:func:`gateway.schema.request_params`); ``experiment_keys`` are examples of report
    keys (the experiment book's)."""
    schemas = {name: model.schema(params) for name, model in COMPONENTS.items()}
    width = params.get("item_width")
    schemas["ItemsRequest"]["description"] = (
        f"{ITEMS_REQUEST.description}; features: {width} numbers, the item feature width "
        "every tenant has now"
        if width
        else f"{ITEMS_REQUEST.description}; features: the tenant's item feature width of "
        "numbers (unknown right now: answered 400 when another length, 503 when unknown)"
    )
    request_id = {
        "name": "x-request-id",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "the request's id in logs, traces and the event log: its first 64 "
        "characters when they are printable ASCII without spaces, else the gateway makes one",
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "RecMesh gateway",
            "version": "1.0.0",
            "description": "Generated from the models the gateway checks requests with "
            "(gateway/schema.py): what this document allows, the gateway accepts.",
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": schemas,
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/recommend": {
                "post": {
                    "summary": "Ranked items for one user (scope recommend)",
                    "parameters": [request_id],
                    "requestBody": _body("RecommendRequest", {"user_id": "u1", "num_items": 10}),
                    "responses": {
                        "200": _json("Recommendation", "ranked items"),
                        **_errors(400, 401, 403, 408, 413, 429, 503),
                    },
                }
            },
            "/v1/events": {
                "post": {
                    "summary": "Log events: clicks, conversions... (scope events)",
                    "requestBody": _body("EventsRequest"),
                    "responses": {
                        "202": _json("Accepted", "stored, or waiting in the gateway's outbox"),
                        **_errors(400, 401, 403, 408, 413, 429, 503),
                    },
                }
            },
            "/v1/items": {
                "put": {
                    "summary": "Insert or replace catalog items, served within a second "
                    "(scope catalog)",
                    "requestBody": _body("ItemsRequest"),
                    "responses": {
                        "202": _json("Accepted", "written to the log (or the outbox first)"),
                        **_errors(400, 401, 403, 408, 413, 429, 503),
                    },
                }
            },
            "/v1/items/{id}": {
                "delete": {
                    "summary": "Withdraw a catalog item, never served again within a second "
                    "(scope catalog)",
                    "parameters": [_path_parameter("id", ID.schema(params), "the item's id")],
                    "responses": {
                        "202": _json("Accepted", "written to the log (or the outbox first)"),
                        **_errors(400, 401, 403, 429, 503),
                    },
                }
            },
            "/v1/experiments/{key}/report": {
                "get": {
                    "summary": "The report of one of the calling tenant's experiments, from "
                    "its event log (scope admin)",
                    "parameters": [
                        _path_parameter(
                            "key",
                            Str().schema(params),
                            "the experiment's key in the experiment book",
                            experiment_keys,
                        )
                    ],
                    "responses": {
                        "200": _json("Report", "the report"),
                        **_errors(400, 401, 403, 404, 429, 503),
                    },
                }
            },
            "/v1/users/{user_id}": {
                "delete": {
                    "summary": "Erase one user of the calling tenant: events, projections, "
                    "features (scope admin)",
                    "parameters": [_path_parameter("user_id", ID.schema(params), "the user")],
                    "responses": {
                        "200": _json("Erasure", "erased"),
                        "202": _json("Erasure", "still running: ask again to confirm"),
                        **_errors(400, 401, 403, 503),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Aggregate health of every dependency",
                    "security": [],
                    "responses": {
                        "200": _json("Health", "every dependency SERVING, not draining"),
                        "503": _json("Health", "a dependency is not SERVING, or draining"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (OpenMetrics when the Accept header asks)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "the exposition format",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "the OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
