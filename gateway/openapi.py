"""The OpenAPI 3.1 description served on ``GET /openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "gRPC status code name"},
        "message": {"type": "string"},
        "field": {"type": "string", "description": "the request field at fault"},
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "invalid body; `field` names the culprit",
        401: "missing or unknown x-api-key",
        429: "over quota; see the Retry-After header",
        503: "no useful answer can be produced",
    }
    return {
        str(code): {
            "description": text[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code in codes
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "RecMesh gateway", "version": "1.0.0"},
    "components": {
        "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        "schemas": {
            "Error": _ERROR,
            "RecommendRequest": {
                "type": "object",
                "required": ["user_id"],
                "properties": {
                    "user_id": {"type": "string", "minLength": 1, "maxLength": 256},
                    "num_items": {"type": "integer", "minimum": 1, "maximum": 500, "default": 10},
                    "context": {"type": "object", "additionalProperties": {"type": "string"}},
                    "debug": {"type": "boolean", "default": False},
                },
            },
            "RecommendResponse": {
                "type": "object",
                "properties": {
                    "request_id": {"type": "string"},
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "item_id": {"type": "integer"},
                                "score": {"type": "number"},
                                "rank": {"type": "integer"},
                                "source": {
                                    "type": "string",
                                    "enum": ["ann", "trending", "popular", "fallback", "explore"],
                                },
                            },
                        },
                    },
                    "experiments": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "key": {"type": "string"},
                                "variant": {"type": "string"},
                            },
                        },
                    },
                    "degraded": {"type": "array", "items": {"type": "string"}},
                    "stage_ms": {"type": "object", "additionalProperties": {"type": "number"}},
                },
            },
            "EventsRequest": {
                "type": "object",
                "required": ["events"],
                "properties": {
                    "events": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1000,
                        "items": {
                            "type": "object",
                            "required": ["event_id", "type", "user_id", "ts"],
                            "properties": {
                                "event_id": {"type": "string", "maxLength": 128},
                                "type": {
                                    "type": "string",
                                    "enum": [
                                        "impression",
                                        "click",
                                        "conversion",
                                        "exposure",
                                        "dismiss",
                                    ],
                                },
                                "user_id": {"type": "string"},
                                "item_id": {"type": "integer", "minimum": 0},
                                "request_id": {"type": "string", "maxLength": 128},
                                "ts": {"type": "integer", "description": "ms since the epoch"},
                                "position": {"type": "integer"},
                                "propensity": {"type": "number", "minimum": 0, "maximum": 1},
                                "attributes": {"type": "object"},
                            },
                        },
                    }
                },
            },
        },
    },
    "security": [{"apiKey": []}],
    "paths": {
        "/v1/recommend": {
            "post": {
                "summary": "Ranked items for one user",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/RecommendRequest"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "ranked items",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RecommendResponse"}
                            }
                        },
                    },
                    **_errors(400, 401, 429, 503),
                },
            }
        },
        "/v1/events": {
            "post": {
                "summary": "Log events (clicks, conversions, ...)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/EventsRequest"}
                        }
                    },
                },
                "responses": {"202": {"description": "accepted"}, **_errors(400, 401, 503)},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Aggregate health of every dependency",
                "security": [],
                "responses": {"200": {"description": "all SERVING"}, "503": {"description": "not"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
    },
}
