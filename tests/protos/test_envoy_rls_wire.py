"""The Envoy rate limit service v3 protos in ``protos/envoy`` are wire-compatible with Envoy.

The protos are compiled with grpc_tools' protoc at test time into a temporary directory. The
messages are then loaded into a private descriptor pool (never the default one, so this test
cannot collide with generated code other tests import), and checked three ways: every field's
name, number and type against Envoy's API; exact serialized bytes of hand-encoded examples; and
the gRPC method path Envoy's ratelimit filter calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
PROTO_FILES = (
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/extensions/common/ratelimit/v3/ratelimit.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/type/v3/ratelimit_unit.proto",
)
METHOD_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

RLS = "envoy.service.ratelimit.v3"
RESPONSE = f"{RLS}.RateLimitResponse"
DESCRIPTOR = "envoy.extensions.common.ratelimit.v3.RateLimitDescriptor"
HEADER_VALUE = "envoy.config.core.v3.HeaderValue"

# Envoy's API, field by field: (name, number, type, repeated). Message and enum types are given
# by full name. Sources: envoy/service/ratelimit/v3/rls.proto,
# envoy/extensions/common/ratelimit/v3/ratelimit.proto, envoy/config/core/v3/base.proto.
ENVOY_FIELDS: dict[str, list[tuple[str, int, str, bool]]] = {
    f"{RLS}.RateLimitRequest": [
        ("domain", 1, "string", False),
        ("descriptors", 2, DESCRIPTOR, True),
        ("hits_addend", 3, "uint32", False),
    ],
    RESPONSE: [
        ("overall_code", 1, f"{RESPONSE}.Code", False),
        ("statuses", 2, f"{RESPONSE}.DescriptorStatus", True),
        ("response_headers_to_add", 3, HEADER_VALUE, True),
        ("request_headers_to_add", 4, HEADER_VALUE, True),
        ("raw_body", 5, "bytes", False),
        ("dynamic_metadata", 6, "google.protobuf.Struct", False),
        ("quota", 7, f"{RESPONSE}.Quota", False),
    ],
    f"{RESPONSE}.RateLimit": [
        ("requests_per_unit", 1, "uint32", False),
        ("unit", 2, f"{RESPONSE}.RateLimit.Unit", False),
        ("name", 3, "string", False),
    ],
    f"{RESPONSE}.Quota": [
        ("requests", 1, "uint32", False),
        ("valid_until", 2, "google.protobuf.Timestamp", False),
        ("id", 3, "string", False),
    ],
    f"{RESPONSE}.DescriptorStatus": [
        ("code", 1, f"{RESPONSE}.Code", False),
        ("current_limit", 2, f"{RESPONSE}.RateLimit", False),
        ("limit_remaining", 3, "uint32", False),
        ("duration_until_reset", 4, "google.protobuf.Duration", False),
        ("quota", 5, f"{RESPONSE}.Quota", False),
    ],
    DESCRIPTOR: [
        ("entries", 1, f"{DESCRIPTOR}.Entry", True),
        ("limit", 2, f"{DESCRIPTOR}.RateLimitOverride", False),
        ("hits_addend", 3, "google.protobuf.UInt64Value", False),
    ],
    f"{DESCRIPTOR}.Entry": [
        ("key", 1, "string", False),
        ("value", 2, "string", False),
    ],
    f"{DESCRIPTOR}.RateLimitOverride": [
        ("requests_per_unit", 1, "uint32", False),
        ("unit", 2, "envoy.type.v3.RateLimitUnit", False),
    ],
    HEADER_VALUE: [
        ("key", 1, "string", False),
        ("value", 2, "string", False),
        ("raw_value", 3, "bytes", False),
    ],
}

UNITS = {"UNKNOWN": 0, "SECOND": 1, "MINUTE": 2, "HOUR": 3, "DAY": 4, "MONTH": 5, "YEAR": 6}
ENVOY_ENUMS: dict[str, dict[str, int]] = {
    f"{RESPONSE}.Code": {"UNKNOWN": 0, "OK": 1, "OVER_LIMIT": 2},
    f"{RESPONSE}.RateLimit.Unit": UNITS,
    "envoy.type.v3.RateLimitUnit": UNITS,
}

_SCALAR_NAMES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
}


@dataclass(frozen=True)
class Compiled:
    """Output of one protoc run: generated Python files and a pool holding the messages."""

    out_dir: Path
    pool: descriptor_pool.DescriptorPool

    def message(self, full_name: str) -> Any:
        """A new, empty message of the given type."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    out_dir = tmp_path_factory.mktemp("envoy_protos")
    descriptor_set = out_dir / "envoy.binpb"
    well_known = resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--descriptor_set_out={descriptor_set}",
            "--include_imports",
            *(str(PROTO_ROOT / name) for name in PROTO_FILES),
        ]
    )
    assert status == 0, "protoc failed; its errors are in the captured output"
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file_proto in files.file:
        pool.Add(file_proto)
    return Compiled(out_dir=out_dir, pool=pool)


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return str(field.message_type.full_name)
    if field.enum_type is not None:
        return str(field.enum_type.full_name)
    return _SCALAR_NAMES[field.type]


@pytest.mark.parametrize("message_name", sorted(ENVOY_FIELDS))
def test_fields_match_envoy(compiled: Compiled, message_name: str) -> None:
    message: Descriptor = compiled.pool.FindMessageTypeByName(message_name)
    declared = [
        (field.name, field.number, _type_name(field), field.is_repeated) for field in message.fields
    ]
    assert sorted(declared, key=lambda f: f[1]) == ENVOY_FIELDS[message_name]


@pytest.mark.parametrize("enum_name", sorted(ENVOY_ENUMS))
def test_enums_match_envoy(compiled: Compiled, enum_name: str) -> None:
    enum = compiled.pool.FindEnumTypeByName(enum_name)
    assert {value.name: value.number for value in enum.values} == ENVOY_ENUMS[enum_name]


def test_quota_expiry_is_a_oneof(compiled: Compiled) -> None:
    quota = compiled.pool.FindMessageTypeByName(f"{RESPONSE}.Quota")
    oneof = quota.oneofs_by_name["expiration_specifier"]
    assert [field.name for field in oneof.fields] == ["valid_until"]


def test_service_is_the_one_envoy_calls(compiled: Compiled) -> None:
    service = compiled.pool.FindServiceByName(f"{RLS}.RateLimitService")
    method = service.methods_by_name["ShouldRateLimit"]
    assert method.input_type.full_name == f"{RLS}.RateLimitRequest"
    assert method.output_type.full_name == RESPONSE
    assert not method.client_streaming and not method.server_streaming
    stub_source = (compiled.out_dir / "envoy/service/ratelimit/v3/rls_pb2_grpc.py").read_text()
    assert METHOD_PATH in stub_source


# RateLimitRequest{domain: "recmesh", descriptors: [{entries: [tenant=acme, route=recommend],
# limit: {100 per MINUTE}, hits_addend: 5}], hits_addend: 3}, encoded by hand.
REQUEST_BYTES = b"".join(
    [
        b"\x0a\x07recmesh",  # field 1 (domain), length-delimited
        b"\x12\x2e",  # field 2 (descriptors), 46 bytes follow
        b"\x0a\x0e\x0a\x06tenant\x12\x04acme",  # entries[0]: key=1, value=2
        b"\x0a\x12\x0a\x05route\x12\x09recommend",  # entries[1]
        b"\x12\x04\x08\x64\x10\x02",  # limit=2: requests_per_unit=100, unit=MINUTE
        b"\x1a\x02\x08\x05",  # hits_addend=3: UInt64Value{value: 5}
        b"\x18\x03",  # field 3 (hits_addend), varint 3
    ]
)


def _request(compiled: Compiled) -> Any:
    request = compiled.message(f"{RLS}.RateLimitRequest")
    request.domain = "recmesh"
    descriptor = request.descriptors.add()
    for key, value in (("tenant", "acme"), ("route", "recommend")):
        entry = descriptor.entries.add()
        entry.key, entry.value = key, value
    descriptor.limit.requests_per_unit = 100
    descriptor.limit.unit = UNITS["MINUTE"]
    descriptor.hits_addend.value = 5
    request.hits_addend = 3
    return request


def test_request_serializes_to_envoy_bytes(compiled: Compiled) -> None:
    encoded = _request(compiled).SerializeToString(deterministic=True)
    assert encoded[0] == 0x0A  # domain: field 1, wire type 2
    assert encoded[9] == 0x12  # descriptors: field 2, wire type 2
    assert encoded[-2] == 0x18  # hits_addend: field 3, wire type 0
    assert encoded == REQUEST_BYTES


def test_request_parses_envoy_bytes(compiled: Compiled) -> None:
    parsed = compiled.message(f"{RLS}.RateLimitRequest")
    parsed.ParseFromString(REQUEST_BYTES)
    assert parsed == _request(compiled)
    assert parsed.descriptors[0].HasField("hits_addend")


# RateLimitResponse with every top-level field set, encoded by hand.
RESPONSE_BYTES = b"".join(
    [
        b"\x08\x02",  # field 1 (overall_code) = OVER_LIMIT
        b"\x12\x18",  # statuses[0], 24 bytes
        b"\x08\x02",  # code = OVER_LIMIT (limit_remaining 0 is not encoded)
        b"\x12\x10\x08\x64\x10\x02\x1a\x0aper-tenant",  # current_limit: 100/MINUTE "per-tenant"
        b"\x22\x02\x08\x1e",  # duration_until_reset=4: Duration{seconds: 30}
        b"\x12\x11",  # statuses[1], 17 bytes
        b"\x08\x01",  # code = OK
        b"\x18\x07",  # limit_remaining = 7
        b"\x2a\x0b\x08\x0a\x12\x03\x08\xe8\x07\x1a\x02q1",  # quota=5: 10, until t=1000s, "q1"
        b"\x1a\x18\x0a\x11x-ratelimit-limit\x12\x03100",  # field 3 (response_headers_to_add)
        b"\x22\x0e\x0a\x08x-tenant\x1a\x02\xff\x00",  # field 4 (request_headers_to_add) raw
        b"\x2a\x09slow down",  # field 5 (raw_body)
        b"\x32\x13\x0a\x11\x0a\x06reason\x12\x07\x1a\x05quota",  # field 6: {"reason": "quota"}
        b"\x3a\x0a\x08\x32\x1a\x06shared",  # field 7 (quota): 50 requests, id "shared"
    ]
)


def _response(compiled: Compiled) -> Any:
    response = compiled.message(RESPONSE)
    response.overall_code = 2
    over = response.statuses.add()
    over.code = 2
    over.current_limit.requests_per_unit = 100
    over.current_limit.unit = UNITS["MINUTE"]
    over.current_limit.name = "per-tenant"
    over.duration_until_reset.seconds = 30
    ok = response.statuses.add()
    ok.code = 1
    ok.limit_remaining = 7
    ok.quota.requests = 10
    ok.quota.valid_until.seconds = 1000
    ok.quota.id = "q1"
    shown = response.response_headers_to_add.add()
    shown.key, shown.value = "x-ratelimit-limit", "100"
    forwarded = response.request_headers_to_add.add()
    forwarded.key, forwarded.raw_value = "x-tenant", b"\xff\x00"
    response.raw_body = b"slow down"
    response.dynamic_metadata.fields["reason"].string_value = "quota"
    response.quota.requests = 50
    response.quota.id = "shared"
    return response


def test_response_serializes_to_envoy_bytes(compiled: Compiled) -> None:
    encoded = _response(compiled).SerializeToString(deterministic=True)
    assert encoded == RESPONSE_BYTES


def test_response_parses_envoy_bytes(compiled: Compiled) -> None:
    parsed = compiled.message(RESPONSE)
    parsed.ParseFromString(RESPONSE_BYTES)
    assert parsed == _response(compiled)
    assert parsed.statuses[1].quota.WhichOneof("expiration_specifier") == "valid_until"
