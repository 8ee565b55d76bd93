"""The request models (``gateway/schema.py``) against the reference JSON Schema validator:
the OpenAPI document is emitted from the same models the server checks with, and here the
two verdicts are compared on documents Schemathesis generates from that document, valid
and invalid. No server: the models alone (the fuzz of the running gateway is
``test_schemathesis.py``)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.jsonmodel import INT32, Model
from gateway.openapi import openapi_document
from gateway.schema import (
    EVENTS_REQUEST,
    ITEMS_REQUEST,
    RECOMMEND_REQUEST,
    REPORT,
    client_request_id,
    parse_events,
    parse_items,
    parse_json,
    parse_recommend,
    request_params,
)
from mesh.errors import InvalidArgument
from tests.gateway.schemathesis_hooks import holds_byte_gap

NOW_MS = 1_790_000_000_000
PARAMS = request_params(500, NOW_MS, item_width=3)
DOCUMENT = openapi_document(PARAMS, ["retrieval-k"])
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
REQUESTS = [
    ("/v1/recommend", "POST", RECOMMEND_REQUEST),
    ("/v1/events", "POST", EVENTS_REQUEST),
    ("/v1/items", "PUT", ITEMS_REQUEST),
]


def accepted(model: Model, document: Any) -> bool:
    try:
        model.check(document, "", PARAMS)
    except InvalidArgument:
        return False
    return True


def reference(model: Model) -> jsonschema.Draft202012Validator:
    schema = model.schema(PARAMS)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(("path", "method", "model"), REQUESTS)
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, "negative"])
def test_the_server_accepts_exactly_what_the_document_allows(
    path: str, method: str, model: Model, mode: str
) -> None:
    validator = reference(model)
    strategy = SCHEMA[path][method].as_strategy(schemathesis.GenerationMode(mode))

    @settings(
        max_examples=60,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def agree(case: schemathesis.Case[Any]) -> None:
        body = case.body
        try:
            json.dumps(body)
        except (TypeError, ValueError):
            assume(False)  # not a JSON document (a negative case of another media type)
        assume(not holds_byte_gap(body))  # the documented gap: bytes vs characters
        assert accepted(model, body) == validator.is_valid(body), body

    agree()


@pytest.mark.parametrize(
    ("document", "valid"),
    [
        ({"user_id": "u1", "num_items": 1.0}, True),  # an integer in JSON Schema
        ({"user_id": "u1", "num_items": 1e2}, True),
        ({"user_id": "u1", "num_items": 1.5}, False),
        ({"user_id": "u1", "num_items": True}, False),
        ({"user_id": "u1", "context": {"a": 1.5, "b": "x"}}, True),
        ({"user_id": "u1", "context": {"a": True}}, False),
        ({"user_id": "u1", "context": {"a": None}}, False),
        ({"user_id": "u1", "context": {str(i): "" for i in range(65)}}, False),
        ({"user_id": ""}, False),
        ({"user_id": "x" * 128}, True),
        ({"user_id": "x" * 129}, False),
    ],
)
def test_recommend_examples(document: Any, valid: bool) -> None:
    assert accepted(RECOMMEND_REQUEST, document) == valid
    assert reference(RECOMMEND_REQUEST).is_valid(document) == valid


def event(**changes: Any) -> dict[str, Any]:
    return {"event_id": "e1", "type": "click", "user_id": "u1", "ts": NOW_MS} | changes


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"position": INT32[1] + 1}, "events[0].position"),  # was a 500
        ({"position": INT32[0] - 1}, "events[0].position"),
        ({"ts": 2**63}, "events[0].ts"),  # was a 500
        ({"ts": 0}, "events[0].ts"),
        ({"ts": NOW_MS - 8 * 86_400_000}, "events[0].ts"),
        ({"ts": NOW_MS + 25 * 3_600_000}, "events[0].ts"),
        ({"event_id": ""}, "events[0].event_id"),
        ({"user_id": ""}, "events[0].user_id"),
        ({"type": "item_upsert"}, "events[0].type"),
        ({"type": "exposure"}, "events[0].type"),  # the gateway's own: reports count them
        ({"type": "error"}, "events[0].type"),
        ({"propensity": 1.5}, "events[0].propensity"),
        ({"attributes": {"a": [1]}}, "events[0].attributes.a"),
        ({"attributes": {str(i): "" for i in range(65)}}, "events[0].attributes"),
        ({"attributes": {"a": "v" * 1025}}, "events[0].attributes.a"),
        ({"attributes": {"k" * 1025: "v"}}, "events[0].attributes"),
        ({"attributes": {"a": 10**400}}, "events[0].attributes.a"),  # text of 401 bytes
    ],
)
def test_an_event_out_of_range_is_refused_naming_the_field(
    changes: dict[str, Any], field: str
) -> None:
    raw = json.dumps({"events": [event(**changes)]}).encode()
    with pytest.raises(InvalidArgument) as refused:
        parse_events(raw, PARAMS)
    assert refused.value.field == field
    assert not reference(EVENTS_REQUEST).is_valid(json.loads(raw))


def test_a_lone_surrogate_is_refused_as_not_text() -> None:
    """JSON can escape one ("\\ud800"); it is no Unicode text, and was a 500."""
    raw = b'{"events": [{"event_id": "e", "type": "click", "user_id": "\\ud800", "ts": 1}]}'
    with pytest.raises(InvalidArgument, match="lone surrogate") as refused:
        parse_events(raw, PARAMS)
    assert refused.value.field == "events[0].user_id"


def test_the_event_window_is_in_the_message() -> None:
    raw = json.dumps({"events": [event(ts=NOW_MS - 8 * 86_400_000)]}).encode()
    with pytest.raises(InvalidArgument, match="days old"):
        parse_events(raw, PARAMS)


def test_event_attributes_at_their_bounds_are_kept_as_text() -> None:
    attributes = {f"{i:0>1024}": "v" * 1024 for i in range(62)} | {"n": 10**308, "x": 1.5}
    document = {"events": [event(attributes=attributes)]}
    parsed = parse_events(json.dumps(document).encode(), PARAMS)
    assert parsed[0].attributes["n"] == str(10**308)
    assert parsed[0].attributes["x"] == "1.5"
    assert dict(parsed[0].attributes) == {k: str(v) for k, v in attributes.items()}
    assert reference(EVENTS_REQUEST).is_valid(document)


def test_an_event_at_the_edges_of_the_window_is_accepted() -> None:
    edges = [event(ts=NOW_MS - 7 * 86_400_000), event(ts=NOW_MS + 24 * 3_600_000)]
    parsed = parse_events(json.dumps({"events": edges}).encode(), PARAMS)
    assert [e.ts_ms for e in parsed] == [edge["ts"] for edge in edges]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"features": [1.0, 2.0]}, "items[0].features"),  # the width is 3
        ({"features": [1e39, 0, 0]}, "items[0].features[0]"),  # over float32
        ({"category": -1}, "items[0].category"),
        ({"category": 2**31}, "items[0].category"),
        ({"colour": "red"}, "items[0].colour"),
        ({"attributes": {"k": 1}}, "items[0].attributes.k"),
    ],
)
def test_an_item_out_of_range_is_refused_naming_the_field(item: dict[str, Any], field: str) -> None:
    raw = json.dumps({"items": [{"item_id": "i1", "features": [0, 0, 0]} | item]}).encode()
    with pytest.raises(InvalidArgument) as refused:
        parse_items(raw, PARAMS)
    assert refused.value.field == field


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"user_id": NaN}', b'{"user_id": Infinity}', b"[" * 100_000, b"\xff"],
)
def test_what_is_not_json_is_refused_as_the_body(raw: bytes) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_recommend(raw, PARAMS)
    assert refused.value.field == "body"


def test_integers_as_json_schema_has_them() -> None:
    body = parse_recommend(b'{"user_id": "u1", "num_items": 7.0}', PARAMS)
    assert body.num_items == 7 and isinstance(body.num_items, int)
    assert parse_json(b"12") == 12


@pytest.mark.parametrize(
    ("header", "kept"),
    [("abc-123", "abc-123"), ("x" * 70, "x" * 64), ("a\tb", ""), ("é", ""), ("a b", ""), ("", "")],
)
def test_a_client_request_id_is_kept_only_when_metadata_can_carry_it(
    header: str, kept: str
) -> None:
    assert client_request_id(header) == kept


def test_the_report_model_is_the_proto_in_proto3_json() -> None:
    from google.protobuf import json_format
    from recmesh.experiment.v1 import experiment_pb2

    report = experiment_pb2.Report(experiment_key="k", entries=2**40, alpha=float("nan"))
    report.variants.add(variant_key="control", users=3)
    rendered = json_format.MessageToDict(
        report, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    REPORT.check(rendered, "", PARAMS)
    reference(REPORT).validate(rendered)
    assert rendered["entries"] == str(2**40) and rendered["alpha"] == "NaN"


@given(st.text(max_size=200))
@settings(max_examples=200, derandomize=True, database=None)
def test_the_byte_gap_is_only_strings_within_characters_and_over_bytes(text: str) -> None:
    from gateway.schema import ID

    schema_allows = reference(ID).is_valid(text)
    try:
        ID.check(text, "user_id", PARAMS)
        server_accepts = True
    except InvalidArgument:
        server_accepts = False
    if schema_allows != server_accepts:
        assert schema_allows and holds_byte_gap(text)
