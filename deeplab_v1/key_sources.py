"""Where each key of an experiment got its value: the YAML file, or a ``--set KEY=VALUE`` on the command
line, so that a message blames the right one (issue #21: a typo in ``--set crf_search.num_imgs=5`` was
reported as an error of the YAML file); and the schema's errors (pydantic's ``ValidationError``) told in
those terms: the dotted key, what it must be, the value given. Used by ``deeplab_v1.config``."""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["KeySources", "at", "unknown_keys_message", "problem", "unknown", "schema_error_message", "type_name"]


class KeySources(str):
    """Where each key's value came from: the experiment file (this string: its path) or a ``--set``.

    Issue #21: a typo in ``--set crf_search.num_imgs=5`` was reported as an error of the YAML file. Every
    message of ``load_config`` names ``of(key)`` instead of the file.
    """

    sets: dict[str, str]

    def __new__(cls, path: str, overrides: list[str] = ()) -> "KeySources":
        obj = super().__new__(cls, path)
        obj.sets = {}
        for text in overrides:
            obj.sets[text.split("=", 1)[0].strip()] = text.strip()  # a later --set of a key wins
        return obj

    def of(self, key: str) -> str:
        """``--set KEY=VALUE`` when that override gave ``key`` (or a section above it); ``FILE with --set
        ...`` when an override changed a key under ``key``; else the file."""
        key = key.split("[", 1)[0]
        for k, text in reversed(self.sets.items()):
            if key == k or key.startswith(k + "."):
                return f"--set {text}"
        under = [text for k, text in self.sets.items() if k.startswith(key + ".")]
        return f"{str(self)} with --set {', --set '.join(under)}" if under else str(self)


def at(where: str, key: str) -> str:
    """``where.of(key)`` for ``KeySources``, else ``where`` itself (a plain label)."""
    return where.of(key) if isinstance(where, KeySources) else str(where)


def unknown_keys_message(where: str, dotted: list[str], known: list[str]) -> str:
    """The one message of unknown keys: where the first came from, the keys, the closest known name."""
    guess = difflib.get_close_matches(dotted[0].rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return (f"{at(where, dotted[0])}: unknown key {', '.join(repr(d) for d in dotted)}{hint}; "
            f"known keys here: {', '.join(sorted(known))}")


#: pydantic's error types of a value outside a field's limits (``Field(ge=..., gt=..., min_length=...)``).
LIMITS = {"greater_than": "be > {gt}", "greater_than_equal": "be >= {ge}", "less_than": "be < {lt}",
          "less_than_equal": "be <= {le}", "too_short": "have at least {min_length} items",
          "too_long": "have at most {max_length} items"}


def problem(what: str, sub: str = "") -> PydanticCustomError:
    """The error a check of ours inside the schema raises (a validator): reported as ``key '<key>' <what>``,
    ``<key>`` the field's dotted key (``.<sub>`` added: a key inside it, e.g. an ``lr_mult`` pattern)."""
    return PydanticCustomError("deeplab", "{what}", {"what": what, "sub": sub})


def unknown(keys: list[str]) -> PydanticCustomError:
    """The error of unknown ``keys`` in a section that checks its own keys (reported as pydantic's
    ``extra="forbid"`` is: ``unknown_keys_message`` with the section's ``known_keys()``)."""
    return PydanticCustomError("deeplab_unknown", "unknown keys {keys}", {"keys": keys})


def type_name(tp: Any) -> str:
    """An annotation in words: ``int``, ``list of float``, ``'step' or 'poly'``, ``int or null``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return type_name(get_args(tp)[0])
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _bare(tp: Any) -> Any:
    return _bare(get_args(tp)[0]) if get_origin(tp) is Annotated else tp


def _locate(loc: tuple, kind: str, cls: type, raw: Any) -> tuple[str, Any, Any, Any]:
    """(dotted key, value given, annotation, pydantic ``FieldInfo``) of an error at ``loc``: the deepest
    field on it (list items as ``key[i]``), or the whole field when it may be null (``int or null``), is a
    mapping, or has its own message for a value outside its limits (``json_schema_extra["must"]``)."""
    key, value, tp, field = "", raw, cls, None
    for part in loc:
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            field = tp.model_fields[part]
            key, tp = (f"{key}.{part}" if key else str(part)), field.annotation
        elif isinstance(part, int) and get_origin(_bare(tp)) is list:
            key, tp = f"{key}[{part}]", get_args(_bare(tp))[0]
        else:
            break
        ok = isinstance(value, dict) and part in value or isinstance(value, list) and part < len(value)
        value = value[part] if ok else None
        own = kind in LIMITS and (field.json_schema_extra or {}).get("must")
        if get_origin(_bare(tp)) in (Union, types.UnionType, dict) or own:
            break
    return key, value, tp, field


def schema_error_message(exc: ValidationError, cls: type, raw: dict, where: str) -> str:
    """The one-line message of the schema's first error (unknown keys first, the shallowest section's),
    naming where the key's value came from (``at``) and the dotted key.

    Args:
        exc: what ``cls.model_validate(raw)`` raised.
        cls: the schema (a pydantic model whose sections are models with ``known_keys()``).
        raw: the mapping that was validated (the values shown are the ones given).
        where: a ``KeySources`` (or a plain label).
    """
    errors = exc.errors()
    unknowns = [(e["loc"][:-1], [e["loc"][-1]]) if e["type"] == "extra_forbidden" else (e["loc"], e["ctx"]["keys"])
                for e in errors if e["type"] in ("extra_forbidden", "deeplab_unknown")]
    if unknowns:
        parent = min((p for p, _ in unknowns), key=len)
        key, _, section, _ = _locate(parent, "", cls, raw)
        names = [k for p, keys in unknowns if p == parent for k in keys]
        return unknown_keys_message(where, [f"{key}.{k}" if key else str(k) for k in names], section.known_keys())
    error = errors[0]
    kind, ctx = error["type"], error.get("ctx") or {}
    key, value, tp, field = _locate(error["loc"], kind, cls, raw)
    if kind == "deeplab":
        key, what = (f"{key}.{ctx['sub']}" if ctx["sub"] else key), ctx["what"]
    elif kind in LIMITS:
        limits = {k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()}
        must = (field.json_schema_extra or {}).get("must") or LIMITS[kind].format(**limits)
        what = f"must {must}, got {value}"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"{at(where, key)}: section '{key}' must be a mapping, got {value!r}"
    else:
        what = f"must be {type_name(tp)}, got {value!r}"
    return f"{at(where, key)}: key '{key}' {what}"
