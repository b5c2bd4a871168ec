"""Daydream's parameter models (pydantic-like), backed by sdstream's Rust validation.

A model holds the canonical JSON object that the Rust core produced (every field present,
defaults filled). Construction and every assignment send the whole object through the core,
so the accept/reject decision and the message are the core's, exactly as the C ABI and the
HTTP server see them.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple, Type, Union

import numpy as np

from . import _sdstream

ValidationError = _sdstream.ValidationError

# Type aliases for annotations, as the stubs name them. UpdateKind: what an update cost, in
# core's spelling, written as the union of one-value Literals that type checkers (and stubtest,
# comparing with the stub) make of Literal[...].
UpdateKind = Union[Literal["unchanged"], Literal["hot"], Literal["controlnet_swap"], Literal["reload"]]
Prompt = Union[str, List[Tuple[str, float]]]
Seed = Union[int, List[Tuple[int, float]]]

# The core's JSON parser refuses bodies nested deeper than this (serde_json's recursion limit);
# stopping at the same depth here keeps Python's own recursion far from its limit, so a deep or
# self-containing value is a ValidationError, never a RecursionError.
_MAX_DEPTH = 128


# A JSON text as the core takes it (bytes must be UTF-8).
_JsonText = Union[str, bytes, bytearray]

# Where a value sits in the body, built only for messages: (parent, key-or-index), or None.
_Path = Optional[tuple]


def _where(path: _Path) -> str:
    parts = []
    while path is not None:
        path, step = path
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            name = step if len(step) <= 40 else step[:40] + "..."
            name = name.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
            parts.append(f".{name}")
    text = "".join(reversed(parts)).lstrip(".")
    return f" at {text}" if text else ""


def _plain(value: Any, path: _Path = None, depth: int = 0, open_ids: Optional[List[int]] = None) -> Any:
    """`value` as plain JSON values (dict with str keys, list, str, int, float, bool, None):
    models become their dump, tuples and numpy arrays lists, numpy scalars Python numbers,
    path-like keys text. Anything else, a value nested deeper than the core reads, or a dict /
    list that contains itself raises `ValidationError` naming where it is."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        item = value.item()
        if isinstance(item, np.generic):  # longdouble, clongdouble: no Python equivalent
            raise ValidationError(f"invalid JSON: numpy {type(value).__name__} is not a JSON value{_where(path)}")
        return _plain(item, path, depth, open_ids)
    if isinstance(value, _Model):
        return value.model_dump()
    if depth >= _MAX_DEPTH:
        raise ValidationError(f"invalid JSON: nested more than {_MAX_DEPTH} levels deep{_where(path)}")
    open_ids = [] if open_ids is None else open_ids
    if id(value) in open_ids:
        raise ValidationError(f"invalid JSON: a dict or list contains itself{_where(path)}")
    open_ids.append(id(value))
    try:
        if isinstance(value, Mapping):
            out = {}
            for key, item in value.items():
                name = _key(key, path)
                out[name] = _plain(item, (path, name), depth + 1, open_ids)
            return out
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            return [_plain(v, (path, i), depth + 1, open_ids) for i, v in enumerate(value)]
    finally:
        open_ids.pop()
    raise ValidationError(f"invalid JSON: {type(value).__name__} is not a JSON value{_where(path)}")


def _key(key: Any, path: _Path) -> str:
    """An object key as JSON text: a str, or a path (a LoRA or model folder)."""
    if isinstance(key, os.PathLike):
        key = os.fspath(key)
        if isinstance(key, bytes):
            key = os.fsdecode(key)
    if not isinstance(key, str):
        raise ValidationError(
            f"invalid JSON: object keys must be strings; got {type(key).__name__}{_where(path)}"
        )
    return key


def _to_json(data: Any) -> str:
    plain = _plain(data)
    try:
        # Compact, like serde_json: the core's messages quote positions in this text. NaN and
        # infinity are written as such, and the core refuses them as invalid JSON.
        return json.dumps(plain, allow_nan=True, separators=(",", ":"))
    except ValueError as e:  # an int too long for Python's str() (4300 digits by default)
        raise ValidationError(f"invalid JSON: {e}") from None


def _text_or_path(value: Any, what: str) -> str:
    """A model id or folder given as text or a path."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
        if isinstance(value, bytes):
            value = os.fsdecode(value)
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a model id or a folder path; got {type(value).__name__}")
    return value


def _settings_json(settings: Optional[Mapping[str, Any]]) -> Optional[str]:
    if settings is None:
        return None
    return _sdstream.validate_settings(_to_json(settings))


class _Model:
    """Common behaviour of the three models; subclasses say how the core validates them."""

    __slots__ = ("_data", "_settings")
    _nested: ClassVar[Dict[str, "Type[_Model]"]] = {}

    def __init__(self, **data: Any) -> None:
        self._init(data, None)

    def _init(self, data: Mapping[str, Any], settings: Optional[str]) -> None:
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "_data", self._canonical(_to_json(data), settings))

    @classmethod
    def _canonical(cls, body: _JsonText, settings: Optional[str]) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _new(cls, data: Mapping[str, Any], settings: Optional[str]):
        model = cls.__new__(cls)
        model._init(data, settings)
        return model

    # -- pydantic's API -----------------------------------------------------------------------

    @classmethod
    def model_validate(cls, obj: Any, *, context: Optional[Mapping[str, Any]] = None):
        """Validates a dict (or a model). For `StreamDiffusionParams`, `context` may hold
        engine settings (e.g. ``{"allow_any_resolution": True}``) that relax the rules."""
        if isinstance(obj, cls):
            obj = obj._data
        if not isinstance(obj, Mapping):
            raise ValidationError(
                f"invalid JSON: expected a dict for {cls.__name__}, got {type(obj).__name__}"
            )
        return cls._new(obj, _settings_json(context))

    @classmethod
    def model_validate_json(cls, json_data: "str | bytes", *, context: Optional[Mapping[str, Any]] = None):
        """Validates a JSON text (str, or UTF-8 bytes)."""
        model = cls.__new__(cls)
        settings = _settings_json(context)
        object.__setattr__(model, "_settings", settings)
        object.__setattr__(model, "_data", cls._canonical(json_data, settings))
        return model

    def model_dump(self, *, mode: str = "python", exclude_none: bool = False, **_: Any) -> Dict[str, Any]:
        """Every field as plain Python values (a deep copy)."""
        data = json.loads(json.dumps(self._data))
        if exclude_none:
            data = {k: v for k, v in data.items() if v is not None}
        return data

    def model_dump_json(self, *, indent: Optional[int] = None, exclude_none: bool = False, **_: Any) -> str:
        """Every field as a JSON text."""
        return json.dumps(self.model_dump(exclude_none=exclude_none), indent=indent)

    def model_copy(self, *, update: Optional[Mapping[str, Any]] = None, deep: bool = False):
        """A copy with `update` applied. Unlike pydantic, the result is validated."""
        if update is not None and not isinstance(update, Mapping):
            raise ValidationError(f"model_copy: update must be a dict, got {type(update).__name__}")
        data = self.model_dump()
        data.update(update or {})
        return type(self)._new(data, self._settings)

    # -- attributes ---------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name not in data:
            raise AttributeError(f"{type(self).__name__!s} has no field {name!r}")
        value = json.loads(json.dumps(data[name]))
        wrap = type(self)._nested.get(name)
        if wrap is not None and value is not None:
            if isinstance(value, list):
                return [wrap._new(v, None) for v in value]
            return wrap._new(value, None)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"cannot set {name!r}")
        data = dict(self._data)
        data[name] = value
        object.__setattr__(self, "_data", self._canonical(_to_json(data), self._settings))

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._data))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._data == other._data  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, like pydantic's models

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._data)
        return f"{type(self).__name__}({fields})"

    def __copy__(self):
        return type(self)._new(self._data, self._settings)

    def __deepcopy__(self, memo: Any):
        return self.__copy__()

    def __reduce__(self):
        return (_rebuild, (type(self), self.model_dump_json(), self._settings))


def _rebuild(cls: "Type[_Model]", body: str, settings: Optional[str]) -> _Model:
    model = cls.__new__(cls)
    object.__setattr__(model, "_settings", settings)
    object.__setattr__(model, "_data", cls._canonical(body, settings))
    return model


class ControlNetConfig(_Model):
    """One ControlNet (Daydream's `ControlNetConfig`). `model_id` is required; the rules that
    need the whole parameter set (model family, duplicates, guidance window) run when it is
    placed in a `StreamDiffusionParams`."""

    __slots__ = ()

    @classmethod
    def _canonical(cls, body: _JsonText, settings: Optional[str]) -> Dict[str, Any]:
        return json.loads(_sdstream.validate_nested("controlnet", body))


class IPAdapterConfig(_Model):
    """IPAdapter settings (Daydream's `IPAdapterConfig`). Built on its own it is enabled, as
    in Daydream; the parameter set's default is a disabled adapter."""

    __slots__ = ()

    @classmethod
    def _canonical(cls, body: _JsonText, settings: Optional[str]) -> Dict[str, Any]:
        return json.loads(_sdstream.validate_nested("ip_adapter", body))


class StreamDiffusionParams(_Model):
    """Daydream's `StreamDiffusionParams`: keyword construction with Daydream's defaults,
    validated by sdstream's core (unknown fields are an error). Attribute assignment
    re-validates the whole parameter set; an invalid value raises `ValidationError` and leaves
    the object unchanged."""

    __slots__ = ()
    _nested: ClassVar[Dict[str, "Type[_Model]"]] = {
        "controlnets": ControlNetConfig,
        "ip_adapter": IPAdapterConfig,
    }

    @classmethod
    def _canonical(cls, body: _JsonText, settings: Optional[str]) -> Dict[str, Any]:
        return json.loads(_sdstream.validate_params(body, settings))
