"""Daydream's parameter models (pydantic-like), backed by sdstream's Rust validation.

A model holds the canonical JSON object that the Rust core produced (every field present,
defaults filled). Construction and every assignment send the whole object through the core,
so the accept/reject decision and the message are the core's, exactly as the C ABI and the
HTTP server see them.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Dict, Mapping, Optional

from . import _sdstream

ValidationError = _sdstream.ValidationError


def _plain(value: Any) -> Any:
    """Turns models, tuples and numpy scalars into plain JSON values."""
    if isinstance(value, _Model):
        return value.model_dump()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return value.item()  # numpy scalar
    return value


def _to_json(data: Any) -> str:
    try:
        # Compact, like serde_json: the core's messages quote positions in this text.
        return json.dumps(_plain(data), allow_nan=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValidationError(f"invalid JSON: {e}") from None


def _settings_json(settings: Optional[Mapping[str, Any]]) -> Optional[str]:
    if settings is None:
        return None
    return _sdstream.validate_settings(_to_json(settings))


class _Model:
    """Common behaviour of the three models; subclasses say how the core validates them."""

    __slots__ = ("_data", "_settings")
    _nested: ClassVar[Dict[str, type]] = {}

    def __init__(self, **data: Any) -> None:
        self._init(data, None)

    def _init(self, data: Mapping[str, Any], settings: Optional[str]) -> None:
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "_data", self._canonical(_to_json(data), settings))

    @classmethod
    def _canonical(cls, body: str, settings: Optional[str]) -> Dict[str, Any]:
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
        """Validates a JSON text."""
        if isinstance(json_data, (bytes, bytearray)):
            json_data = json_data.decode("utf-8")
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


def _rebuild(cls: type, body: str, settings: Optional[str]) -> _Model:
    model = cls.__new__(cls)
    object.__setattr__(model, "_settings", settings)
    object.__setattr__(model, "_data", cls._canonical(body, settings))  # type: ignore[attr-defined]
    return model


class ControlNetConfig(_Model):
    """One ControlNet (Daydream's `ControlNetConfig`). `model_id` is required; the rules that
    need the whole parameter set (model family, duplicates, guidance window) run when it is
    placed in a `StreamDiffusionParams`."""

    __slots__ = ()

    @classmethod
    def _canonical(cls, body: str, settings: Optional[str]) -> Dict[str, Any]:
        return json.loads(_sdstream.validate_nested("controlnet", body))


class IPAdapterConfig(_Model):
    """IPAdapter settings (Daydream's `IPAdapterConfig`). Built on its own it is enabled, as
    in Daydream; the parameter set's default is a disabled adapter."""

    __slots__ = ()

    @classmethod
    def _canonical(cls, body: str, settings: Optional[str]) -> Dict[str, Any]:
        return json.loads(_sdstream.validate_nested("ip_adapter", body))


class StreamDiffusionParams(_Model):
    """Daydream's `StreamDiffusionParams`: keyword construction with Daydream's defaults,
    validated by sdstream's core (unknown fields are an error). Attribute assignment
    re-validates the whole parameter set; an invalid value raises `ValidationError` and leaves
    the object unchanged."""

    __slots__ = ()
    _nested: ClassVar[Dict[str, type]] = {
        "controlnets": ControlNetConfig,
        "ip_adapter": IPAdapterConfig,
    }

    @classmethod
    def _canonical(cls, body: str, settings: Optional[str]) -> Dict[str, Any]:
        return json.loads(_sdstream.validate_params(body, settings))
