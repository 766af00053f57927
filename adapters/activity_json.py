"""Fast JSON mapping for botbuilder.schema models: drop-in for msrest's (de)serialization.

msrest's ``Model.serialize()`` and ``Model.deserialize()`` walk every attribute of a
model through key transformers, key extractors and string-keyed type dispatch, with a
new ``Serializer``/``Deserializer`` (and a scan of the schema module) per call: for
the many-field ``Activity``, a large share of a turn's CPU (``bench/codec.py``). Here each class's
attribute map is compiled once into a plan of (attribute, JSON key, converter), and the
converters handle the value types the wire actually carries:

- ``to_json(model)`` is ``model.serialize()``: the same dict, keys in the same order
  (the JSON posted to the channel is byte for byte the same), ``None`` left out,
  nested models and lists of models recursed, ``iso-8601`` datetimes formatted as
  msrest formats them, ``object`` values (JSON, possibly holding models) copied as
  msrest copies them, enums in ``str`` fields as their value.
- ``model_from_json(cls, data)`` (``activity_from_json(data)`` for an ``Activity``) is
  ``cls().deserialize(data)``: the same attribute values, nested models built through
  their constructors, unknown keys kept in ``additional_properties``, datetimes parsed
  to the very tzinfo objects msrest's isodate makes.

Whatever the fast path does not recognise as a case it reproduces exactly, it hands
the whole model to msrest, which then returns its result or raises its own error:
a model class outside ``botbuilder.schema`` or with a feature the plan does not
model (flattened keys, validation, polymorphism, XML, ``bytearray``); a value of any
other type than the plain one its field declares (a number in a ``str`` field, which
msrest coerces with ``str()``; a string where an object is expected; a naive datetime,
which msrest logs a warning about); a datetime string not in the strict
``YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]`` shape; and any error at all on the fast path.
``tests/test_activity_json.py`` checks the equivalence with Hypothesis.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Any, Final, TypeVar

import botbuilder.schema as schema
from botbuilder.schema import Activity
from isodate.tzinfo import UTC as ISODATE_UTC  # type: ignore[import-untyped]
from isodate.tzinfo import FixedOffset
from msrest.serialization import Model

M = TypeVar("M", bound=Model)

# How often each direction handed a model to msrest, since start (for tests and benches).
fallbacks: dict[str, int] = {"to_json": 0, "from_json": 0}


class _Fallback(Exception):
    """The fast path cannot vouch for this value: msrest does the whole model."""


_MISSING: Final = object()
_Convert = Callable[[Any, Any], Any]


# --- to_json --------------------------------------------------------------------------


def to_json(model: Model) -> dict[str, Any]:
    """``model.serialize()``, without msrest's generic walk."""
    try:
        return _model_out(model)
    except Exception:  # the fast path's doubt or error: msrest answers, or raises, itself
        fallbacks["to_json"] += 1
        result: dict[str, Any] = model.serialize()  # type: ignore[no-untyped-call]
        return result


def _model_out(model: Any) -> dict[str, Any]:
    plan = _plan(type(model))
    fields = model.__dict__
    out: dict[str, Any] = {}
    for attr, key, out_fn, out_item, _in_fn, _in_item, str_passes in plan.fields:
        value = fields.get(attr, _MISSING)
        if value is None:
            continue  # msrest leaves None out
        if str_passes and type(value) is str:
            out[key] = value
        else:
            out[key] = out_fn(value, out_item)
    return out


def _str_out(value: Any, _: Any) -> Any:
    # msrest's serialize_unicode: an enum's value, else str(value).
    if type(value) is str:
        return value
    if isinstance(value, Enum):
        return value.value
    raise _Fallback


def _exact_out(kind: type) -> _Convert:
    def convert(value: Any, _: Any) -> Any:
        if type(value) is kind:  # msrest's kind(value) is the value itself
            return value
        raise _Fallback

    return convert


def _iso_out(value: Any, _: Any) -> str:
    # msrest's Serializer.serialize_iso, for an aware datetime (a naive one: msrest
    # warns that it takes it as UTC, so it does the model).
    if type(value) is not datetime or not value.tzinfo:
        raise _Fallback
    utc = value.utctimetuple()
    if utc.tm_year > 9999 or utc.tm_year < 1:
        raise _Fallback
    microseconds = str(value.microsecond).rjust(6, "0").rstrip("0").ljust(3, "0")
    return (
        f"{utc.tm_year:04}-{utc.tm_mon:02}-{utc.tm_mday:02}"
        f"T{utc.tm_hour:02}:{utc.tm_min:02}:{utc.tm_sec:02}.{microseconds}Z"
    )


def _object_out(value: Any, _: Any = None) -> Any:
    # msrest's serialize_object on JSON values and models; anything else (a tuple, an
    # enum, a date, a dict subclass, a non-str key) it treats its own way.
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Fallback
            out[key] = _object_out(item)
        return out
    if kind is list:
        return [_object_out(item) for item in value]
    if isinstance(value, Model):
        return _model_out(value)
    raise _Fallback


def _model_value_out(value: Any, _: Any) -> Any:
    # msrest serializes whatever model is there by its own attribute map.
    if isinstance(value, Model):
        return _model_out(value)
    raise _Fallback


def _list_out(value: Any, item: tuple[_Convert, Any]) -> list[Any]:
    if type(value) is not list:
        raise _Fallback
    convert, inner = item
    return [None if v is None else convert(v, inner) for v in value]


def _dict_out(value: Any, item: tuple[_Convert, Any]) -> dict[str, Any]:
    if type(value) is not dict:
        raise _Fallback
    convert, inner = item
    out = {}
    for key, v in value.items():
        if type(key) is not str:
            raise _Fallback
        out[key] = None if v is None else convert(v, inner)
    return out


# --- from_json ------------------------------------------------------------------------


def activity_from_json(data: Any) -> Activity:
    """``Activity().deserialize(data)``, without msrest's generic walk."""
    return model_from_json(Activity, data)


def model_from_json(cls: type[M], data: Any) -> M:
    """``cls().deserialize(data)`` for a botbuilder.schema model class."""
    try:
        result: M = _model_in(data, cls)
        return result
    except Exception:  # msrest answers, or raises its own error
        fallbacks["from_json"] += 1
        model: M = cls.deserialize(data)  # type: ignore[no-untyped-call]
        return model


def _model_in(data: Any, cls: type[Model]) -> Any:
    if type(data) is not dict:
        raise _Fallback  # msrest reads a JSON string, or rejects
    plan = _plan(cls)
    by_key = plan.by_key
    kwargs = plan.nones.copy()  # every attribute, in map order, as msrest passes them
    unknown = False
    for key, value in data.items():  # the keys present, not the ~50 the map knows
        field = by_key.get(key)
        if field is None:
            unknown = True
        elif value is not None and not (field[6] and type(value) is str):
            kwargs[field[0]] = field[4](value, field[5])
        else:
            kwargs[field[0]] = value
    model = cls(**kwargs)
    if unknown:
        # msrest's _build_additional_properties, operation for operation (so in its order).
        missing = set(data.keys()) - plan.known_keys
        model.additional_properties = {key: data[key] for key in missing}
    return model


def _str_in(value: Any, _: Any) -> Any:
    if type(value) is str:
        return value
    raise _Fallback  # msrest: str(value)


def _iso_in(value: Any, _: Any) -> Any:
    if isinstance(value, datetime):
        return value  # msrest passes a datetime through
    if type(value) is not str:
        raise _Fallback
    return parse_iso(value)


_ISO: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.([0-9]+))?(?:(Z)|([+-])([0-9]{2}):([0-9]{2}))?"
)


def parse_iso(text: str) -> datetime:
    """msrest's ``Deserializer.deserialize_iso`` for the strict ISO 8601 shape channels
    send; ``_Fallback`` for anything else. The tzinfo is what isodate builds: its ``UTC``
    for ``Z``, a new ``FixedOffset`` named as written for an offset, none without."""
    match = _ISO.fullmatch(text)
    if match is None:
        raise _Fallback
    fraction, zulu, sign, tz_hour, tz_minute = match.groups()
    # msrest cuts the fraction to 6 digits; isodate floors it to microseconds.
    microsecond = int((fraction + "00000")[:6]) if fraction else 0
    if zulu:
        tzinfo: Any = ISODATE_UTC
    elif sign:
        factor = -1 if sign == "-" else 1
        tzinfo = FixedOffset(factor * int(tz_hour), factor * int(tz_minute), f"{sign}{tz_hour}:{tz_minute}")
    else:
        tzinfo = None
    # The regex fixed the layout; fromisoformat reads the fields and checks their ranges
    # as isodate's date() and time() do (month 13, 24:00, 23:59:60 are errors).
    day = datetime.fromisoformat(text[:19])
    moment = datetime(day.year, day.month, day.day, day.hour, day.minute, day.second, microsecond, tzinfo)
    if not 1 < day.year < 9999 or (sign and (tz_hour > "23" or tz_minute > "59")):
        # msrest's check, only where it can fail: an offset of a day or more is an
        # error, and near year 1 or 9999 one can take the UTC time out of range.
        utc = moment.utctimetuple()
        if utc.tm_year > 9999 or utc.tm_year < 1:
            raise _Fallback
    return moment


def _exact_in(kind: type) -> _Convert:
    def convert(value: Any, _: Any) -> Any:
        if type(value) is kind:
            return value
        raise _Fallback  # msrest coerces (int("3"), bool("true"), float(3)) or rejects

    return convert


def _object_in(value: Any, _: Any = None) -> Any:
    # msrest's deserialize_object: a deep copy of the JSON.
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict:
        return {key: _object_in(item) for key, item in value.items()}
    if kind is list:
        return [_object_in(item) for item in value]
    raise _Fallback


def _model_value_in(value: Any, cls: type[Model]) -> Any:
    return _model_in(value, cls)


def _list_in(value: Any, item: tuple[_Convert, Any]) -> list[Any]:
    if type(value) is not list:
        raise _Fallback  # msrest also takes a set, and rejects the rest
    convert, inner = item
    return [None if v is None else convert(v, inner) for v in value]


def _dict_in(value: Any, item: tuple[_Convert, Any]) -> dict[Any, Any]:
    if type(value) is not dict:
        raise _Fallback  # msrest also takes a list of {key, value}
    convert, inner = item
    return {key: None if v is None else convert(v, inner) for key, v in value.items()}


# --- plans ----------------------------------------------------------------------------

# msrest type name -> (to JSON, from JSON, whether a str value passes unchanged both ways)
_BASIC: Final[dict[str, tuple[_Convert, _Convert, bool]]] = {
    "str": (_str_out, _str_in, True),
    "bool": (_exact_out(bool), _exact_in(bool), False),
    "int": (_exact_out(int), _exact_in(int), False),
    "float": (_exact_out(float), _exact_in(float), False),
    "iso-8601": (_iso_out, _iso_in, False),
    "object": (_object_out, _object_in, True),
}

# (to JSON, its argument, from JSON, its argument, whether a str passes unchanged both ways)
_Converters = tuple[_Convert, Any, _Convert, Any, bool]
# (attribute, JSON key, *_Converters)
_Field = tuple[str, str, _Convert, Any, _Convert, Any, bool]


class _Plan:
    __slots__ = ("by_key", "fields", "known_keys", "nones")

    def __init__(self, fields: tuple[_Field, ...]) -> None:
        self.fields = fields
        self.by_key = {field[1]: field for field in fields}
        self.known_keys = frozenset(self.by_key)
        self.nones: dict[str, Any] = dict.fromkeys(field[0] for field in fields)


_PLANS: dict[type, _Plan | None] = {}
_FLATTENED = re.compile(r"(?<!\\)\.")


def _plan(cls: type) -> _Plan:
    """The class's compiled attribute map (``_Fallback`` if msrest must do it)."""
    try:
        plan = _PLANS[cls]
    except KeyError:
        plan = _PLANS[cls] = _compile(cls)
    if plan is None or len(cls._attribute_map) != len(plan.fields):  # type: ignore[attr-defined]
        raise _Fallback  # e.g. enable_additional_properties_sending() since
    return plan


def _compile(cls: type) -> _Plan | None:
    """None unless every feature of the class's map is one the plan reproduces."""
    if not _plain_schema_model(cls):
        return None
    attribute_map: dict[str, dict[str, Any]] = cls._attribute_map  # type: ignore[attr-defined]
    fields: list[_Field] = []
    for attr, desc in attribute_map.items():
        key, type_name = desc.get("key"), desc.get("type")
        if set(desc) - {"key", "type"} or not isinstance(key, str) or not isinstance(type_name, str):
            return None
        if not key or _FLATTENED.search(key) or "\\" in key or attr == "additional_properties":
            return None
        if hasattr(cls, attr):  # a class attribute or descriptor: getattr is not __dict__
            return None
        converters = _converters(type_name)
        if converters is None:
            return None
        fields.append((attr, key, *converters))
    keys = [field[1] for field in fields]
    if len(set(keys)) != len(keys):
        return None
    return _Plan(tuple(fields))


def _plain_schema_model(cls: type) -> bool:
    return (
        issubclass(cls, Model)
        and cls.__module__.rsplit(".", 1)[0] == schema.__name__
        and getattr(schema, cls.__name__, None) is cls  # msrest's dependencies resolve to it
        and not cls._validation  # no readonly or constant attributes
        and not cls.__dict__.get("_subtype_map")
        and not hasattr(cls, "_xml_map")
        and cls.__getattribute__ is object.__getattribute__
        and not hasattr(cls, "__getattr__")
    )


def _converters(type_name: str) -> _Converters | None:
    if type_name in _BASIC:
        out_fn, in_fn, str_passes = _BASIC[type_name]
        return out_fn, None, in_fn, None, str_passes
    if len(type_name) > 2 and type_name[0] + type_name[-1] in ("[]", "{}"):
        if type_name[1] in "[{":
            return None  # nested containers: msrest's
        inner = _converters(type_name[1:-1])
        if inner is None:
            return None
        inner_out, inner_out_item, inner_in, inner_in_item, _ = inner
        if type_name[0] == "[":
            return _list_out, (inner_out, inner_out_item), _list_in, (inner_in, inner_in_item), False
        return _dict_out, (inner_out, inner_out_item), _dict_in, (inner_in, inner_in_item), False
    model = getattr(schema, type_name, None)
    if isinstance(model, type) and issubclass(model, Model) and _plain_schema_model(model):
        return _model_value_out, None, _model_value_in, model, False
    return None
