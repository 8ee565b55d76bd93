"""Hypothesis strategies for the request bytes of a gRPC method, built from its descriptor.

Three classes of input (:data:`KINDS`), each a strategy of wire bytes:

- ``random``: arbitrary bytes, short and long;
- ``valid``: a message of the request type built field by field from its descriptor
  (:func:`requests`): integers at their type's edges, NaN and infinite floats, unknown enum
  numbers, strings and bytes up to megabytes, repeated and map fields up to 100 000
  entries, nested messages; or a seed (a request the service accepts) with some of its
  fields cleared or changed that way. The whole message stays under a byte budget (the
  servers' largest accepted message), so it is a request the server must read;
- ``mutated``: a valid message's wire bytes after 1 to 4 mutations (:data:`MUTATIONS`): bit
  flips, truncation, duplicated slices and fields, unknown field numbers, known fields with
  the wrong wire type, impossible lengths, overlong varints, bad UTF-8 in a string field,
  deeply nested groups.

Values are drawn partly from a :class:`Vocabulary` of words the mesh knows (a tenant, user
and item ids, event types, stream positions, the rate-limit domain), so some requests get
past validation and exercise what is behind it.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

KINDS = ("random", "valid", "mutated")
"""The input classes, in the order the tests run them."""

MAX_DEPTH = 4
"""Deepest nesting of message fields a built request has."""

HUGE_SIZES = (129, 1 << 10, 1 << 16, 1 << 20)
"""Lengths of the huge strings and bytes (capped by what is left of the byte budget)."""

HUGE_COUNTS = (100, 1001, 10_000, 100_000)
"""Entries of a huge repeated scalar or map field (capped by the byte budget)."""

HUGE_MESSAGE_COUNTS = (100, 1001, 5000)
"""Entries of a huge repeated message field (building each costs more than a scalar)."""

MAX_FIELD_NUMBER = 2**29 - 1

NOW_MS = int(time.time() * 1000)
"""Now, in ms since the epoch: one of the integers drawn (events need a recent time)."""

_V, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_WIRE_TYPE = {
    **dict.fromkeys(
        (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_BOOL,
            FieldDescriptor.TYPE_ENUM,
        ),
        _V,
    ),
    **dict.fromkeys(
        (FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_DOUBLE),
        _I64,
    ),
    **dict.fromkeys(
        (FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_FLOAT),
        _I32,
    ),
    **dict.fromkeys(
        (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE),
        _LEN,
    ),
    FieldDescriptor.TYPE_GROUP: _SGROUP,
}

_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


@dataclass(frozen=True)
class Vocabulary:
    """Values the mesh gives a meaning to, drawn next to arbitrary ones.

    Attributes:
        words: strings (ids, keys, names) some requests should carry.
        vector_lengths: lengths (in float32 values) of the packed vectors drawn for bytes
            fields, e.g. the artifact set's user and item feature dimensions.
    """

    words: Sequence[str] = ()
    vector_lengths: Sequence[int] = field(default=(1, 4, 32))


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers of ``lo..hi``: its edges and familiar values, small ids, any."""
    edges = {0, 1, -1, 2, 127, 128, 255, 256, 1000, 1001, 10_000, NOW_MS, 2**31, 2**53}
    edges |= {lo, lo + 1, hi, hi - 1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63)}
    return st.one_of(
        st.sampled_from(sorted(v for v in edges if lo <= v <= hi)),
        st.integers(max(lo, 0), min(hi, 3000)),
        st.integers(lo, hi),
    )


def floats(width: Literal[32, 64]) -> st.SearchStrategy[float]:
    """Doubles (``width`` 64) or float32 values (32), NaN and the infinities included."""
    big = 1e308 if width == 64 else 3.4e38
    tiny = 5e-324 if width == 64 else 1e-45
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, math.nan, math.inf, -math.inf, big, -big, tiny]
    return st.one_of(st.sampled_from(edges), st.floats(width=width))


class _Builder:
    """Draws one message, field by field, within a byte budget."""

    def __init__(self, draw: st.DrawFn, budget: int, vocabulary: Vocabulary) -> None:
        self.draw = draw
        self.budget = budget
        self.vocabulary = vocabulary

    def message(self, descriptor: Descriptor, depth: int) -> Message:
        """A message of ``descriptor``'s type, each field set (two times in three) or not."""
        message: Message = GetMessageClass(descriptor)()
        for fd in descriptor.fields:
            if self.draw(st.sampled_from((True, True, False))):
                self._set(message, fd, depth)
        return message

    def vary(self, seed: Message, depth: int) -> Message:
        """``seed`` with some of its fields changed: kept, cleared, set to a drawn value, or
        (messages) varied in turn."""
        message = type(seed)()
        message.CopyFrom(seed)
        descriptor = cast(Descriptor, seed.DESCRIPTOR)
        for fd in descriptor.fields:
            change = self.draw(st.sampled_from(("keep",) * 4 + ("set", "clear", "vary")))
            if change == "clear":
                message.ClearField(fd.name)
            elif change == "set":
                message.ClearField(fd.name)
                self._set(message, fd, depth)
            elif change == "vary" and fd.message_type is not None and depth > 0:
                if fd.message_type.GetOptions().map_entry:
                    continue
                if fd.is_repeated:
                    varied = [self.vary(e, depth - 1) for e in getattr(message, fd.name)]
                    message.ClearField(fd.name)
                    getattr(message, fd.name).extend(varied)
                elif message.HasField(fd.name):
                    inner = self.vary(getattr(message, fd.name), depth - 1)
                    getattr(message, fd.name).CopyFrom(inner)
        return message

    def _set(self, message: Message, fd: FieldDescriptor, depth: int) -> None:
        if fd.message_type is not None and depth <= 0:
            return
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            self._map(message, fd, depth)
        elif fd.is_repeated:
            self._repeated(message, fd, depth)
        elif fd.message_type is not None:
            getattr(message, fd.name).CopyFrom(self.message(fd.message_type, depth - 1))
        else:
            setattr(message, fd.name, self.scalar(fd))

    def _count(self, budget: int, element_bytes: int, huge: Sequence[int] = HUGE_COUNTS) -> int:
        """How many entries a repeated or map field gets: none, a few, or a huge number (one
        of ``huge``); never more than ``budget`` (bytes) holds. Charges them to the budget."""
        size = self.draw(st.sampled_from(("few", "few", "few", "none", "huge")))
        wanted: int = 0
        if size == "few":
            wanted = self.draw(st.integers(1, 4))
        elif size == "huge":
            wanted = self.draw(st.sampled_from(huge))
        count = min(wanted, max(budget, 0) // max(element_bytes, 1))
        self.budget = budget - count * element_bytes
        return count

    def _repeated(self, message: Message, fd: FieldDescriptor, depth: int) -> None:
        target = getattr(message, fd.name)
        budget = self.budget
        if fd.message_type is not None:
            elements = [self.message(fd.message_type, depth - 1) for _ in range(2)]
            size = max(e.ByteSize() for e in elements) + 4
            count = self._count(budget, size, HUGE_MESSAGE_COUNTS)
            target.extend(_cycle(elements, count))
            return
        values = [self.scalar(fd) for _ in range(2)]
        count = self._count(budget, max(_scalar_bytes(v) for v in values))
        if fd.cpp_type in _RANGES and count > 4 and self.draw(st.booleans()):
            target.extend(range(count))  # distinct ids
        else:
            target.extend(_cycle(values, count))

    def _map(self, message: Message, fd: FieldDescriptor, depth: int) -> None:
        target = getattr(message, fd.name)
        budget = self.budget
        entry = fd.message_type
        assert entry is not None
        key_fd = entry.fields_by_name["key"]
        value_fd = entry.fields_by_name["value"]
        huge: Sequence[int] = HUGE_COUNTS
        if value_fd.message_type is not None:
            values: list[Any] = [self.message(value_fd.message_type, depth - 1) for _ in range(2)]
            value_bytes = max(v.ByteSize() for v in values)
            huge = HUGE_MESSAGE_COUNTS
        else:
            values = [self.scalar(value_fd) for _ in range(2)]
            value_bytes = max(_scalar_bytes(v) for v in values)
        count = self._count(budget, value_bytes + 16, huge)
        if count <= 4:
            keys = [self.scalar(key_fd) for _ in range(count)]
        elif key_fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
            keys = [f"k{i}" for i in range(count)]
        elif key_fd.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            keys = [False, True]
        else:
            keys = list(range(count))
        for key, value in zip(keys, _cycle(values, len(keys)), strict=True):
            if value_fd.message_type is not None:
                target[key].CopyFrom(value)
            else:
                target[key] = value

    def _huge(self) -> st.SearchStrategy[int]:
        """A huge length, capped by what is left of the budget when it is drawn."""
        return st.sampled_from(HUGE_SIZES).map(lambda n: min(n, max(self.budget, 0)))

    def scalar(self, fd: FieldDescriptor) -> Any:
        cpp = fd.cpp_type
        value: Any
        if cpp in _RANGES:
            value = self.draw(integers(*_RANGES[cpp]))
        elif cpp == FieldDescriptor.CPPTYPE_DOUBLE:
            value = self.draw(floats(64))
        elif cpp == FieldDescriptor.CPPTYPE_FLOAT:
            value = self.draw(floats(32))
        elif cpp == FieldDescriptor.CPPTYPE_BOOL:
            value = self.draw(st.booleans())
        elif cpp == FieldDescriptor.CPPTYPE_ENUM:
            assert fd.enum_type is not None
            known = [v.number for v in fd.enum_type.values]
            value = self.draw(st.one_of(st.sampled_from(known), integers(-(2**31), 2**31 - 1)))
        elif fd.type == FieldDescriptor.TYPE_BYTES:
            value = self.draw(self._bytes())
        else:
            value = self.draw(self._strings())
        self.budget -= _scalar_bytes(value)
        return value

    def _strings(self) -> st.SearchStrategy[str]:
        words = sorted({*self.vocabulary.words, "", "0", "-1", "\x00", "x" * 128, "é" * 65})
        return st.one_of(
            st.sampled_from(words),
            st.sampled_from(words),
            st.text(max_size=40),
            st.builds(lambda n, c: c * n, self._huge(), st.sampled_from("xé\x00")),
        )

    def _bytes(self) -> st.SearchStrategy[bytes]:
        packed = st.builds(
            lambda value, n: struct.pack("<f", value) * n,
            floats(32),
            st.sampled_from(sorted({0, 1, *self.vocabulary.vector_lengths})),
        )
        return st.one_of(
            st.binary(max_size=64),
            packed,
            self._huge().map(lambda n: b"\xff" * n),
        )


def _cycle(values: Sequence[Any], count: int) -> list[Any]:
    return [values[i % len(values)] for i in range(count)] if values else []


def _scalar_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode()) + 6
    if isinstance(value, bytes):
        return len(value) + 6
    return 11


def requests(
    descriptor: Descriptor,
    vocabulary: Vocabulary,
    *,
    max_bytes: int,
    seeds: Sequence[Message] = (),
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type, about ``max_bytes`` at most (the budget caps the
    huge values): built from nothing, each field set or not, or (half of them, when there
    are ``seeds``: requests the service accepts) a seed with some fields changed."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        builder = _Builder(draw, max_bytes, vocabulary)
        if len(seeds) > 0 and draw(st.booleans()):
            seed: Message = draw(st.sampled_from(seeds))
            return builder.vary(seed, MAX_DEPTH)
        return builder.message(descriptor, MAX_DEPTH)

    return build()


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint (negative values as their 64-bit two's complement)."""
    value &= 2**64 - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _payload(draw: st.DrawFn, wire_type: int, number: int) -> bytes:
    """A field's value of ``wire_type``, well formed or not."""
    if wire_type == _V:
        return varint(draw(integers(0, 2**64 - 1)))
    if wire_type == _I64:
        return draw(st.binary(min_size=8, max_size=8))
    if wire_type == _I32:
        return draw(st.binary(min_size=4, max_size=4))
    if wire_type == _LEN:
        data = draw(st.binary(max_size=32))
        return varint(len(data)) + data
    if wire_type == _SGROUP:  # a group, closed or not
        return tag(number, _EGROUP) if draw(st.booleans()) else b""
    return b""  # an end group without its start, and the invalid wire types 6 and 7


Mutation = Callable[[st.DrawFn, bytearray, Descriptor], bytearray]


def _position(draw: st.DrawFn, wire: bytearray) -> int:
    return draw(st.integers(0, len(wire)))


def _flip_bit(draw: st.DrawFn, wire: bytearray, _: Descriptor) -> bytearray:
    if wire:
        wire[draw(st.integers(0, len(wire) - 1))] ^= 1 << draw(st.integers(0, 7))
    return wire


def _truncate(draw: st.DrawFn, wire: bytearray, _: Descriptor) -> bytearray:
    return wire[: _position(draw, wire)]


def _duplicate_slice(draw: st.DrawFn, wire: bytearray, _: Descriptor) -> bytearray:
    start = _position(draw, wire)
    end = draw(st.integers(start, len(wire)))
    at = _position(draw, wire)
    return wire[:at] + wire[start:end] + wire[at:]


def _append_copy(draw: st.DrawFn, wire: bytearray, _: Descriptor) -> bytearray:
    """The message twice: every field duplicated (a valid merge on the wire)."""
    return wire + wire


def _unknown_field(draw: st.DrawFn, wire: bytearray, descriptor: Descriptor) -> bytearray:
    known = set(descriptor.fields_by_number)
    number = draw(st.integers(1, MAX_FIELD_NUMBER).filter(lambda n: n not in known))
    wire_type = draw(st.sampled_from((_V, _I64, _LEN, _SGROUP, _I32)))
    field_bytes = tag(number, wire_type) + _payload(draw, wire_type, number)
    at = draw(st.sampled_from((0, len(wire))))
    return wire[:at] + field_bytes + wire[at:]


def _wrong_wire_type(draw: st.DrawFn, wire: bytearray, descriptor: Descriptor) -> bytearray:
    """A known field with another wire type than its own (or an invalid one)."""
    if not descriptor.fields:
        return wire
    fd = draw(st.sampled_from(list(descriptor.fields)))
    own = _WIRE_TYPE.get(fd.type, _LEN)
    wire_type = draw(st.sampled_from([w for w in range(8) if w != own]))
    return wire + tag(fd.number, wire_type) + _payload(draw, wire_type, fd.number)


def _bad_length(draw: st.DrawFn, wire: bytearray, descriptor: Descriptor) -> bytearray:
    """A length-delimited field whose length runs past the end of the message."""
    numbers = [fd.number for fd in descriptor.fields] or [1]
    number = draw(st.sampled_from(numbers))
    length = draw(st.sampled_from((1, 100, 2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1)))
    return wire + tag(number, _LEN) + varint(length) + draw(st.binary(max_size=8))


def _overlong_varint(draw: st.DrawFn, wire: bytearray, _: Descriptor) -> bytearray:
    at = _position(draw, wire)
    return wire[:at] + b"\xff" * draw(st.integers(10, 12)) + b"\x01" + wire[at:]


def _bad_utf8(draw: st.DrawFn, wire: bytearray, descriptor: Descriptor) -> bytearray:
    """A string field (or any field when there is none) holding invalid UTF-8."""
    strings = [fd for fd in descriptor.fields if fd.type == FieldDescriptor.TYPE_STRING]
    fields = strings or list(descriptor.fields)
    number = draw(st.sampled_from(fields)).number if fields else 1
    bad = draw(st.sampled_from((b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80")))
    return wire + tag(number, _LEN) + varint(len(bad)) + bad


def _deep_groups(draw: st.DrawFn, wire: bytearray, descriptor: Descriptor) -> bytearray:
    """Unknown groups nested past any parser's recursion limit (closed or not)."""
    known = set(descriptor.fields_by_number)
    number = next(n for n in range(1000, 2000) if n not in known)
    depth = draw(st.sampled_from((50, 101, 1000, 10_000)))
    closing = tag(number, _EGROUP) * depth if draw(st.booleans()) else b""
    return wire + tag(number, _SGROUP) * depth + closing


def _insert_bytes(draw: st.DrawFn, wire: bytearray, _: Descriptor) -> bytearray:
    at = _position(draw, wire)
    return wire[:at] + draw(st.binary(min_size=1, max_size=16)) + wire[at:]


MUTATIONS: tuple[Mutation, ...] = (
    _flip_bit,
    _truncate,
    _duplicate_slice,
    _append_copy,
    _unknown_field,
    _wrong_wire_type,
    _bad_length,
    _overlong_varint,
    _bad_utf8,
    _deep_groups,
    _insert_bytes,
)


def mutated(
    descriptor: Descriptor,
    vocabulary: Vocabulary,
    *,
    max_bytes: int,
    seeds: Sequence[Message] = (),
) -> st.SearchStrategy[bytes]:
    """A valid message of ``descriptor``'s type (:func:`requests`, at most about
    ``max_bytes``), serialised, then mutated 1 to 4 times."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        message = draw(requests(descriptor, vocabulary, max_bytes=max_bytes, seeds=seeds))
        wire = bytearray(message.SerializeToString())
        for _ in range(draw(st.integers(1, 4))):
            mutation = draw(st.sampled_from(MUTATIONS))
            wire = mutation(draw, wire, descriptor)
        return bytes(wire)

    return build()


def one_huge_field(
    base: Message, size: int = 1 << 20, depth: int = MAX_DEPTH
) -> list[tuple[str, Message]]:
    """For every string and bytes field of ``base``'s type, nested ones (the first element
    of a repeated one) and map keys and values included: (its path, a copy of ``base`` with
    that field set to ``size`` bytes of "é" or 0xff)."""
    text, data = "é" * (size // 2), b"\xff" * size
    descriptor = cast(Descriptor, base.DESCRIPTOR)
    found: list[tuple[str, Message]] = []

    def copy() -> Message:
        message = type(base)()
        message.CopyFrom(base)
        return message

    for fd in descriptor.fields:
        entry = fd.message_type
        if entry is not None and entry.GetOptions().map_entry:
            for part in ("key", "value"):
                part_fd = entry.fields_by_name[part]
                if part_fd.cpp_type != FieldDescriptor.CPPTYPE_STRING:
                    continue
                big: Any = text if part_fd.type == FieldDescriptor.TYPE_STRING else data
                message = copy()
                entries = getattr(message, fd.name)
                if part == "key":
                    entries[big]  # reading a missing key inserts its entry
                else:
                    key = next(iter(entries), getattr(GetMessageClass(entry)(), part_fd.name))
                    entries[key] = big
                found.append((f"{fd.name}.{part}", message))
        elif entry is not None:
            if depth <= 0:
                continue
            present = getattr(base, fd.name)
            inner_base = present
            if fd.is_repeated:
                inner_base = present[0] if len(present) else GetMessageClass(entry)()
            for path, inner in one_huge_field(inner_base, size, depth - 1):
                message = copy()
                target = getattr(message, fd.name)
                if not fd.is_repeated:
                    target.CopyFrom(inner)
                elif len(target):
                    target[0].CopyFrom(inner)
                else:
                    target.add().CopyFrom(inner)
                found.append((f"{fd.name}.{path}", message))
        elif fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
            value = text if fd.type == FieldDescriptor.TYPE_STRING else data
            message = copy()
            if not fd.is_repeated:
                setattr(message, fd.name, value)
            elif len(getattr(message, fd.name)):
                getattr(message, fd.name)[0] = value
            else:
                getattr(message, fd.name).append(value)
            found.append((fd.name, message))
    return found


def request_bytes(
    kind: str,
    descriptor: Descriptor,
    vocabulary: Vocabulary,
    *,
    max_bytes: int,
    seeds: Sequence[Message] = (),
) -> st.SearchStrategy[bytes]:
    """Request bytes of input class ``kind`` (one of :data:`KINDS`) for a method whose
    request type is ``descriptor``; ``valid`` ones are at most about ``max_bytes``.
    ``seeds`` (requests the service accepts) are varied and mutated too."""
    if kind == "random":
        return st.one_of(st.binary(max_size=64), st.binary(min_size=64, max_size=4096))
    if kind == "valid":
        return requests(descriptor, vocabulary, max_bytes=max_bytes, seeds=seeds).map(
            lambda message: message.SerializeToString()
        )
    if kind == "mutated":
        return mutated(descriptor, vocabulary, max_bytes=min(max_bytes, 1 << 16), seeds=seeds)
    raise ValueError(f"unknown input class {kind!r}")
