"""The OpenAPI 3.1 description served on ``GET /openapi.json``."""

from __future__ import annotations

from typing import Any

from core.catalog import MAX_ATTRIBUTES, MAX_ID_BYTES, MAX_ITEMS_PER_CALL

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
        400: "invalid body, or a report of an interleaving experiment; `field` names it",
        401: "missing or unknown x-api-key",
        404: "no such experiment for the calling tenant",
        413: "body larger than the gateway's limit (RECMESH_GATEWAY_MAX_BODY_BYTES)",
        429: "over quota, or too many events waiting for delivery; see the Retry-After header",
        503: "no useful answer can be produced, or (with a Retry-After header) the gateway "
        "is over capacity and refused the request before any work",
    }
    return {
        str(code): {
            "description": text[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code in codes
    }


_NUMBER = {"type": "number"}
_ID = {
    "type": "string",
    "minLength": 1,
    "description": f"the tenant's own id, 1..{MAX_ID_BYTES} bytes of UTF-8",
}
_COUNT = {"type": "integer", "minimum": 0}
_INTERVAL = {"type": "object", "properties": {"low": _NUMBER, "high": _NUMBER}}
_LIFT = {
    "type": "object",
    "description": "a treatment against the control (core.experiments.stats.Comparison)",
    "properties": {
        "control_mean": _NUMBER,
        "treatment_mean": _NUMBER,
        "absolute_lift": _NUMBER,
        "absolute_ci": _INTERVAL,
        "relative_lift": _NUMBER,
        "relative_ci": _INTERVAL,
        "p_value": _NUMBER,
        "probability_to_beat": _NUMBER,
        "expected_loss": _NUMBER,
        "variance_reduction": _NUMBER,
    },
}
_SPREAD = {
    "type": "object",
    "properties": {"items_shown": _COUNT, "coverage": _NUMBER, "gini": _NUMBER},
}
_REPORT = {
    "type": "object",
    "description": "an experiment's report from the tenant's event log (docs/experiments.md, "
    "Report); the fields of recmesh.experiment.v1.Report in proto3 JSON (64-bit integers as "
    "strings)",
    "properties": {
        "experiment_key": {"type": "string"},
        "tenant": {"type": "string"},
        "book_version": {"type": "string"},
        "log_position": {"type": "string"},
        "entries": {"type": "string", "description": "uint64"},
        "first_exposure_ms": {"type": "string", "description": "int64, ms since the epoch"},
        "alpha": _NUMBER,
        "variants": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "variant_key": {"type": "string"},
                    "weight": _NUMBER,
                    "users": _COUNT,
                    "exposures": _COUNT,
                    "requests": _COUNT,
                    "impressions": _COUNT,
                    "clicks": _COUNT,
                    "conversions": _COUNT,
                    "ctr": _NUMBER,
                    "conversion_rate": _NUMBER,
                    "errors": _COUNT,
                    "comparisons": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "metric": {"type": "string", "enum": ["ctr", "conversion_rate"]},
                                "lift": _LIFT,
                                "cuped": _LIFT,
                                "not_computed": {"type": "string"},
                            },
                        },
                    },
                    "guardrails": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {
                                    "type": "string",
                                    "enum": ["degraded_share", "p99_latency_ms", "error_rate"],
                                },
                                "bound": _NUMBER,
                                "value": _NUMBER,
                                "requests": _COUNT,
                                "passed": {"type": "boolean"},
                            },
                        },
                    },
                    "spread": _SPREAD,
                },
            },
        },
        "srm": {
            "type": "object",
            "properties": {
                "observed": {"type": "array", "items": _COUNT},
                "expected_share": {"type": "array", "items": _NUMBER},
                "chi2": _NUMBER,
                "p_value": _NUMBER,
                "mismatch": {"type": "boolean"},
            },
        },
        "data_quality": {
            "type": "object",
            "properties": {
                "users_in_several_variants": _COUNT,
                "exposures_of_unknown_variants": _COUNT,
                "impressions_outside_exposure": _COUNT,
                "fallback_requests": _COUNT,
                "unmatched_outcomes": _COUNT,
                "invalid_entries": _COUNT,
                "book_versions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"book_version": {"type": "string"}, "exposures": _COUNT},
                    },
                },
            },
        },
        "catalogue_size": _COUNT,
        "daily": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "day": {"type": "string", "description": "UTC, YYYY-MM-DD"},
                    "variant_key": {"type": "string"},
                    "users": _COUNT,
                    "impressions": _COUNT,
                    "clicks": _COUNT,
                    "conversions": _COUNT,
                    "ctr": _NUMBER,
                    "spread": _SPREAD,
                },
            },
        },
        "covariate_users": _COUNT,
        "entries_read": {"type": "string", "description": "uint64"},
        "rebuilt": {"type": "boolean"},
        "compute_ms": _NUMBER,
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "RecMesh gateway", "version": "1.0.0"},
    "components": {
        "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        "schemas": {
            "Error": _ERROR,
            "Report": _REPORT,
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
                                "item_id": _ID,
                                "score": {"type": "number"},
                                "rank": {"type": "integer"},
                                "source": {
                                    "type": "string",
                                    "enum": [
                                        "ann",
                                        "trending",
                                        "popular",
                                        "fallback",
                                        "explore",
                                        "fresh",
                                    ],
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
                                        "error",
                                    ],
                                },
                                "user_id": _ID,
                                "item_id": _ID,
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
            "ItemsRequest": {
                "type": "object",
                "required": ["items"],
                "properties": {
                    "items": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_ITEMS_PER_CALL,
                        "items": {
                            "type": "object",
                            "required": ["item_id", "features"],
                            "additionalProperties": False,
                            "properties": {
                                "item_id": _ID,
                                "category": {"type": "integer", "minimum": 0, "default": 0},
                                "features": {
                                    "type": "array",
                                    "items": {"type": "number"},
                                    "description": "exactly the tenant's item feature width",
                                },
                                "attributes": {
                                    "type": "object",
                                    "maxProperties": MAX_ATTRIBUTES,
                                    "additionalProperties": {"type": "string"},
                                },
                                "available": {"type": "boolean", "default": True},
                            },
                        },
                    }
                },
            },
            "Accepted": {
                "type": "object",
                "required": ["accepted"],
                "properties": {"accepted": {"type": "integer", "minimum": 0}},
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
                "responses": {"202": {"description": "accepted"}, **_errors(400, 401, 429, 503)},
            }
        },
        "/v1/items": {
            "put": {
                "summary": "Insert or replace catalog items (served within a second)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ItemsRequest"}
                        }
                    },
                },
                "responses": {
                    "202": {
                        "description": "written to the log",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Accepted"}
                            }
                        },
                    },
                    **_errors(400, 401, 413, 429, 503),
                },
            }
        },
        "/v1/items/{id}": {
            "delete": {
                "summary": "Withdraw a catalog item (never served again within a second)",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": _ID},
                ],
                "responses": {
                    "202": {
                        "description": "written to the log",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Accepted"}
                            }
                        },
                    },
                    **_errors(400, 401, 429, 503),
                },
            }
        },
        "/v1/experiments/{key}/report": {
            "get": {
                "summary": "The report of one of the calling tenant's experiments, from its "
                "event log",
                "parameters": [
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "the experiment's key in the experiment book",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "the report",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Report"}}
                        },
                    },
                    **_errors(400, 401, 404, 429, 503),
                },
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
