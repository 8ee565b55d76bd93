"""Declarative JSON models: one description of a JSON value that both checks a decoded
document (the HTTP API's validation, each error naming the field at fault) and emits its
JSON Schema (draft 2020-12, the dialect of OpenAPI 3.1).

Each model implements exactly the JSON Schema keywords it emits, with their JSON Schema
meaning: an ``integer`` is any number without a fractional part (``1.0`` too), a
``boolean`` is never a number, lengths count code points. So what the document allows is
what the server accepts, and what it refuses is refused (``tests/gateway/test_schema.py``
holds every request model to the reference validator, ``jsonschema``, on generated
documents; ``tests/gateway/test_schemathesis.py`` fuzzes the running gateway with it).

One rule JSON Schema cannot state: a length in bytes of UTF-8 (``Str.max_bytes``, the
limit of ids in ``core.catalog``). Such a string carries ``maxLength`` equal to the byte
limit, exact for ASCII and never looser, and says the byte rule in its ``description``.
And a string must be Unicode text: a lone surrogate (which JSON can escape) is refused.

Bounds only known at run time (the largest ``num_items`` of the settings, the accepted
window of event times, a tenant's item feature width) are :class:`Param` s: the document
and the check resolve them from the same ``params``.
"""

from __future__ import annotations

import math
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from mesh.errors import InvalidArgument

Params = Mapping[str, int]
"""Run-time values of :class:`Param` bounds, by name."""

INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
INT64 = (-(2**63), 2**63 - 1)
FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: a larger JSON number would become infinite when packed."""

_ABSENT: Any = object()


@dataclass(frozen=True)
class Param:
    """A bound known at run time: ``params[name]``, else ``default`` (None: no bound)."""

    name: str
    default: int | None = None


Bound = int | float | Param | None


def _resolve(bound: Bound, params: Params) -> int | float | None:
    if isinstance(bound, Param):
        return params.get(bound.name, bound.default)
    return bound


def _invalid(path: str, text: str) -> InvalidArgument:
    name = path or "body"
    return InvalidArgument(f"{name} {text}", field=name)


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _range_text(low: int | float | None, high: int | float | None, integer: bool) -> str:
    if low is not None and high is not None:
        return f"must be in {low}..{high}" if integer else f"must be in [{low}, {high}]"
    if low is not None:
        return f"must be >= {low}"
    return f"must be <= {high}"


class Model(ABC):
    """A JSON value's description: :meth:`schema` for the document, :meth:`check` for the
    server. Subclasses are frozen dataclasses with a ``description``."""

    description: str

    def schema(self, params: Params) -> dict[str, Any]:
        """The JSON Schema of this value with ``params`` resolved."""
        emitted = self._schema(params)
        if text := self._description():
            emitted["description"] = text
        return emitted

    def _description(self) -> str:
        return self.description

    @abstractmethod
    def _schema(self, params: Params) -> dict[str, Any]: ...

    @abstractmethod
    def check(self, value: Any, path: str, params: Params) -> Any:
        """``value`` (decoded JSON) once checked, converted to its Python form.

        Raises:
            InvalidArgument: what the schema refuses, naming ``path`` (or the field of
                ``value`` at fault below it; ``body`` for the root).
        """


@dataclass(frozen=True, kw_only=True)
class Str(Model):
    """A string: ``min_length``/``max_length`` in code points, ``max_bytes`` of UTF-8,
    ``pattern`` matching the whole string, ``enum``."""

    min_length: int = 0
    max_length: int | None = None
    max_bytes: int | None = None
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    description: str = ""

    def _longest(self) -> int | None:
        limits = [n for n in (self.max_length, self.max_bytes) if n is not None]
        return min(limits) if limits else None

    def _description(self) -> str:
        if self.max_bytes is None:
            return self.description
        rule = (
            f"at most {self.max_bytes} bytes of UTF-8 ({self.max_bytes} ASCII characters, "
            "fewer of others)"
        )
        return f"{self.description}; {rule}" if self.description else rule

    def _schema(self, params: Params) -> dict[str, Any]:
        emitted: dict[str, Any] = {"type": "string"}
        if self.enum is not None:
            emitted["enum"] = list(self.enum)
        if self.min_length:
            emitted["minLength"] = self.min_length
        if (longest := self._longest()) is not None:
            emitted["maxLength"] = longest
        if self.pattern is not None:
            emitted["pattern"] = f"^(?:{self.pattern})$"
        return emitted

    def check(self, value: Any, path: str, params: Params) -> str:
        if not isinstance(value, str):
            raise _invalid(path, "must be a string")
        try:
            size = len(value) if value.isascii() else len(value.encode())
        except UnicodeEncodeError as exc:
            raise _invalid(path, "must be Unicode text (it holds a lone surrogate)") from exc
        if len(value) < self.min_length:
            raise _invalid(
                path, "is required" if not value else f"needs {self.min_length}+ characters"
            )
        if self.max_length is not None and len(value) > self.max_length:
            raise _invalid(path, f"is longer than {self.max_length} characters")
        if self.max_bytes is not None and size > self.max_bytes:
            raise _invalid(path, f"is longer than {self.max_bytes} bytes")
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise _invalid(path, f"must match {self.pattern}")
        if self.enum is not None and value not in self.enum:
            raise _invalid(path, f"must be one of {list(self.enum)}")
        return value


_TEXT = Str()
_DOUBLE_MAX = sys.float_info.max
_NUMBER_TEXT_BYTES = len(str(-int(_DOUBLE_MAX)))
"""The longest text of a number within a double's range: a sign and 309 digits."""


@dataclass(frozen=True, kw_only=True)
class Int(Model):
    """An integer (a JSON number without a fractional part) in ``minimum..maximum``;
    ``note`` is added to a range error."""

    minimum: Bound = None
    maximum: Bound = None
    note: str = ""
    description: str = ""

    def _schema(self, params: Params) -> dict[str, Any]:
        emitted: dict[str, Any] = {"type": "integer"}
        if (low := _resolve(self.minimum, params)) is not None:
            emitted["minimum"] = low
        if (high := _resolve(self.maximum, params)) is not None:
            emitted["maximum"] = high
        return emitted

    def check(self, value: Any, path: str, params: Params) -> int:
        # bool is an int subclass, and JSON true is no number.
        # is_integer() is false for inf and nan too.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise _invalid(path, "must be an integer")
        number = int(value)
        low, high = _resolve(self.minimum, params), _resolve(self.maximum, params)
        if (low is not None and number < low) or (high is not None and number > high):
            text = _range_text(low, high, integer=True)
            raise _invalid(path, f"{text}: {self.note}" if self.note else text)
        return number


@dataclass(frozen=True, kw_only=True)
class Num(Model):
    """A number in ``[minimum, maximum]``. Unbounded, it must still be one a float holds
    (a larger JSON number is refused: the server could not use it)."""

    minimum: float | None = None
    maximum: float | None = None
    description: str = ""

    def _schema(self, params: Params) -> dict[str, Any]:
        emitted: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            emitted["minimum"] = self.minimum
        if self.maximum is not None:
            emitted["maximum"] = self.maximum
        return emitted

    def check(self, value: Any, path: str, params: Params) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(path, "must be a number")
        # int and float compare exactly in Python, and inf is out of any finite range.
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise _invalid(path, _range_text(self.minimum, self.maximum, integer=False))
        try:
            number = float(value)
        except OverflowError as exc:
            raise _invalid(path, "is too large") from exc
        if not math.isfinite(number):
            raise _invalid(path, "is too large")
        return number

    def check_all(self, values: list[Any], path: str, params: Params) -> list[float]:
        """:meth:`check` of each of ``values`` (named ``<path>[i]``), in one tight loop: an
        array of features is thousands of numbers."""
        low = -sys.float_info.max if self.minimum is None else self.minimum
        high = sys.float_info.max if self.maximum is None else self.maximum
        checked = []
        for index, value in enumerate(values):
            kind = type(value)  # what JSON decodes to: exactly int or float (bool is apart)
            if (kind is float or kind is int) and low <= value <= high:
                checked.append(float(value))
            else:
                checked.append(self.check(value, f"{path}[{index}]", params))
        return checked


@dataclass(frozen=True, kw_only=True)
class Bool(Model):
    description: str = ""

    def _schema(self, params: Params) -> dict[str, Any]:
        return {"type": "boolean"}

    def check(self, value: Any, path: str, params: Params) -> bool:
        if not isinstance(value, bool):
            raise _invalid(path, "must be a boolean")
        return value


@dataclass(frozen=True, kw_only=True)
class Scalar(Model):
    """A string or a number, kept as its text (``str()`` of the number). A string is
    checked as ``Str(max_bytes=max_bytes)``; a number must be finite and within a double's
    range, so its text never exceeds 310 bytes (``max_bytes`` is not below that)."""

    max_bytes: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < _NUMBER_TEXT_BYTES:
            raise ValueError(f"max_bytes below {_NUMBER_TEXT_BYTES} would refuse some numbers")

    def _schema(self, params: Params) -> dict[str, Any]:
        emitted: dict[str, Any] = {
            "type": ["string", "number"],
            "minimum": -_DOUBLE_MAX,
            "maximum": _DOUBLE_MAX,
        }
        if self.max_bytes is not None:
            emitted["maxLength"] = self.max_bytes
        return emitted

    def check(self, value: Any, path: str, params: Params) -> str:
        if isinstance(value, str):
            return Str(max_bytes=self.max_bytes).check(value, path, params)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(path, "must be a string or a number")
        if not -_DOUBLE_MAX <= value <= _DOUBLE_MAX:
            raise _invalid(path, "must be a finite number within a double's range")
        return str(value)


@dataclass(frozen=True, kw_only=True)
class ProtoDouble(Model):
    """A ``double`` in proto3 JSON: a number, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""

    description: str = ""
    SPECIAL = ("NaN", "Infinity", "-Infinity")

    def _schema(self, params: Params) -> dict[str, Any]:
        return {"anyOf": [{"type": "number"}, {"type": "string", "enum": list(self.SPECIAL)}]}

    def check(self, value: Any, path: str, params: Params) -> float:
        if isinstance(value, str) and value in self.SPECIAL:
            return float(value.lower().replace("infinity", "inf"))
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(path, f"must be a number or one of {list(self.SPECIAL)}")
        return float(value)


@dataclass(frozen=True, kw_only=True)
class Arr(Model):
    """An array of ``items``, ``min_items..max_items`` long."""

    items: Model
    min_items: Bound = 0
    max_items: Bound = None
    description: str = ""

    def _schema(self, params: Params) -> dict[str, Any]:
        emitted: dict[str, Any] = {"type": "array", "items": self.items.schema(params)}
        if low := _resolve(self.min_items, params):
            emitted["minItems"] = low
        if (high := _resolve(self.max_items, params)) is not None:
            emitted["maxItems"] = high
        return emitted

    def check(self, value: Any, path: str, params: Params) -> list[Any]:
        if not isinstance(value, list):
            raise _invalid(path, "must be an array")
        low, high = _resolve(self.min_items, params) or 0, _resolve(self.max_items, params)
        if low == high and len(value) != low:
            raise _invalid(path, f"must hold {low} entries, got {len(value)}")
        if len(value) < low:
            raise _invalid(path, "must not be empty" if low == 1 else f"needs {low}+ entries")
        if high is not None and len(value) > high:
            raise _invalid(path, f"holds more than {high} entries")
        if isinstance(self.items, Num):
            return self.items.check_all(value, path, params)
        return [self.items.check(entry, f"{path}[{i}]", params) for i, entry in enumerate(value)]


@dataclass(frozen=True)
class Prop:
    """A property of an :class:`Obj`: its model, whether it is required, and the value an
    absent optional property takes (none: it stays absent)."""

    model: Model
    required: bool = False
    default: Any = _ABSENT


@dataclass(frozen=True, kw_only=True)
class Obj(Model):
    """An object with ``props``; other properties are ignored, or refused when ``closed``
    (``additionalProperties: false``)."""

    props: Mapping[str, Prop]
    closed: bool = False
    description: str = ""

    def _schema(self, params: Params) -> dict[str, Any]:
        properties = {}
        for name, prop in self.props.items():
            properties[name] = prop.model.schema(params)
            if prop.default is not _ABSENT:
                properties[name]["default"] = prop.default
        emitted: dict[str, Any] = {"type": "object", "properties": properties}
        if required := [name for name, prop in self.props.items() if prop.required]:
            emitted["required"] = required
        if self.closed:
            emitted["additionalProperties"] = False
        return emitted

    def check(self, value: Any, path: str, params: Params) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _invalid(path, "must be an object")
        if self.closed and (unknown := sorted(set(value) - set(self.props))):
            raise InvalidArgument(
                f"unknown field {unknown[0]!r}; {path or 'the body'} has {sorted(self.props)}",
                field=_child(path, unknown[0]),
            )
        checked: dict[str, Any] = {}
        for name, prop in self.props.items():
            if name in value:
                checked[name] = prop.model.check(value[name], _child(path, name), params)
            elif prop.required:
                raise _invalid(_child(path, name), "is required")
            elif prop.default is not _ABSENT:
                checked[name] = prop.default
        return checked


@dataclass(frozen=True, kw_only=True)
class Map(Model):
    """An object used as a map: at most ``max_entries`` keys (each checked by ``keys``,
    errors naming the map), each value checked by ``values`` (named ``<map>.<key>``)."""

    values: Model
    keys: Str | None = None
    max_entries: int | None = None
    description: str = ""

    def _schema(self, params: Params) -> dict[str, Any]:
        emitted: dict[str, Any] = {
            "type": "object",
            "additionalProperties": self.values.schema(params),
        }
        if self.keys is not None:
            emitted["propertyNames"] = self.keys.schema(params)
        if self.max_entries is not None:
            emitted["maxProperties"] = self.max_entries
        return emitted

    def check(self, value: Any, path: str, params: Params) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _invalid(path, "must be an object")
        if self.max_entries is not None and len(value) > self.max_entries:
            raise _invalid(path, f"holds more than {self.max_entries} entries")
        checked = {}
        for key, entry in value.items():
            (self.keys or _TEXT).check(key, path, params)
            checked[key] = self.values.check(entry, _child(path, key), params)
        return checked


def proto_json(message: Descriptor, description: str = "") -> Obj:
    """The model of ``message`` in proto3 JSON as ``json_format.MessageToDict`` writes it
    with the proto's field names and every field without presence: those are required,
    64-bit integers are decimal strings, enums their names, doubles may be ``"NaN"``."""
    return Obj(
        props={f.name: Prop(_proto_field(f), required=not f.has_presence) for f in message.fields},
        closed=True,
        description=description,
    )


def _proto_field(f: FieldDescriptor) -> Model:
    entry = f.message_type
    if entry is not None and entry.GetOptions().map_entry:
        return Map(values=_proto_value(entry.fields_by_name["value"]))
    single = _proto_value(f)
    return Arr(items=single) if f.is_repeated else single


_INTEGERS = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
}
_DECIMALS = {
    FieldDescriptor.TYPE_INT64: ("-?[0-9]+", "int64"),
    FieldDescriptor.TYPE_SINT64: ("-?[0-9]+", "int64"),
    FieldDescriptor.TYPE_SFIXED64: ("-?[0-9]+", "int64"),
    FieldDescriptor.TYPE_UINT64: ("[0-9]+", "uint64"),
    FieldDescriptor.TYPE_FIXED64: ("[0-9]+", "uint64"),
}


def _proto_value(f: FieldDescriptor) -> Model:
    if f.type in _INTEGERS:
        low, high = _INTEGERS[f.type]
        return Int(minimum=low, maximum=high)
    if f.type in _DECIMALS:
        pattern, kind = _DECIMALS[f.type]
        return Str(pattern=pattern, description=f"{kind}, as a decimal string")
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return ProtoDouble()
    if f.type == FieldDescriptor.TYPE_BOOL:
        return Bool()
    if f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
        return Str(enum=_enum_names(f.enum_type))
    if f.type == FieldDescriptor.TYPE_BYTES:
        return Str(description="base64")
    if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
        return proto_json(f.message_type)
    return Str()


def _enum_names(enum: EnumDescriptor) -> tuple[str, ...]:
    return tuple(value.name for value in enum.values)
