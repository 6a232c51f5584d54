"""One table of option constraints: what the parsers, the ``--help`` texts and the checks all read (issue 22, item 4).

A dataclass field carries its constraint in ``metadata={"check": ...}`` (``Range``, ``Choice``, ``Each``, ``NonEmpty``
or ``All`` of them); ``check_fields(obj)`` runs every field's type and constraint check in one loop (from
``__post_init__``) and raises ``OptionError`` naming the key, the value and what is allowed; the caller adds where
the value came from (a YAML file, the command line, an adapter's ``octsam_config.json``). ``coerce`` turns a value
read from YAML into the field's type or refuses it, and ``describe`` gives the help text its "allowed" part. This
module imports nothing heavy: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
from collections.abc import Sequence
from typing import Any

from octsam.errors import OctSamError

#: transformers.SchedulerType values (tests/test_robustness.py checks the list against transformers).
SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)  # fmt: skip
#: Accelerate's mixed-precision names, plus octsam's "auto".
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")


class OptionError(OctSamError):
    """A bad option value: ``key``, ``value``, ``allowed``; ``source`` (a file, the command line) is added later."""

    def __init__(self, key: str, value: Any, allowed: str, source: str | None = None):
        self.key, self.value, self.allowed, self.source = key, value, allowed, source
        where = f" (from {source})" if source else ""
        super().__init__(f"option {key} = {value!r}{where} is not allowed: {allowed}.")

    def at(self, source: str) -> OptionError:
        return OptionError(self.key, self.value, self.allowed, source)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Range:
    """A finite number in [min, max] (open ends with ``min_open`` / ``max_open``; None: unbounded)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def ok(self, value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return False
        return not (self.max is not None and (value >= self.max if self.max_open else value > self.max))

    def describe(self) -> str:
        low = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
        high = "" if self.max is None else f"{'<' if self.max_open else '<='} {self.max:g}"
        return "a finite number " + " and ".join(p for p in (low, high) if p) if (low or high) else "a finite number"

    def bad(self) -> Any:
        if self.min is not None:
            return self.min - 1 if not self.min_open else self.min
        if self.max is not None:
            return self.max + 1
        return float("nan")


def Positive() -> Range:  # noqa: N802 - reads as a type in the table
    return Range(0, min_open=True)


def NonNegative() -> Range:  # noqa: N802
    return Range(0)


def Fraction(open_top: bool = False) -> Range:  # noqa: N802
    return Range(0, 1, max_open=open_top)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``values`` (a tuple, or a function returning one: a registry that may grow, a heavy import)."""

    choices: Any

    @property
    def values(self) -> tuple:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def ok(self, value: Any) -> bool:
        return isinstance(value, (str, int, float)) and value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))

    def bad(self) -> Any:
        return "no-such-choice"


@dataclasses.dataclass(frozen=True)
class NonEmpty:
    """A list with at least one item, or a string that is not blank."""

    def ok(self, value: Any) -> bool:
        return bool(value.strip()) if isinstance(value, str) else bool(value)

    def describe(self) -> str:
        return "not empty"

    def bad(self) -> Any:
        return []


@dataclasses.dataclass(frozen=True)
class Each:
    """Every item of a list passes ``check``."""

    check: Any

    def ok(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(self.check.ok(v) for v in value)

    def describe(self) -> str:
        return f"each {self.check.describe()}"

    def bad(self) -> Any:
        return [self.check.bad()]


@dataclasses.dataclass(frozen=True)
class Length:
    """A list of one of the given lengths."""

    lengths: tuple[int, ...]

    def ok(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) in self.lengths

    def describe(self) -> str:
        return f"{' or '.join(map(str, self.lengths))} values"

    def bad(self) -> Any:
        return [1.0] * (max(self.lengths) + 1)


@dataclasses.dataclass(frozen=True)
class All:
    checks: tuple

    def ok(self, value: Any) -> bool:
        return all(c.ok(value) for c in self.checks)

    def describe(self) -> str:
        return ", ".join(c.describe() for c in self.checks)

    def bad(self) -> Any:
        return self.checks[0].bad()


def checked(table: dict[str, Any]):
    """Class decorator: the constraint table ``{field name: constraint}`` goes into each field's metadata
    (``metadata["check"]``) and ``__post_init__`` checks every field with ``check_fields`` before anything else."""

    def decorate(cls):
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise TypeError(f"{cls.__name__}: constraints for unknown fields {unknown}")
        for name, constraint in table.items():
            known[name].metadata = types.MappingProxyType({**known[name].metadata, "check": constraint})
        original = cls.__dict__.get("__post_init__")
        if original is not None:  # the generated __init__ calls it by name: checks first, then the class's own

            def __post_init__(self) -> None:
                check_fields(self)
                original(self)

            cls.__post_init__ = __post_init__
            return cls
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs) -> None:
            init(self, *args, **kwargs)
            check_fields(self)

        cls.__init__ = __init__
        return cls

    return decorate


# ------------------------------------------------------------------------------------------------ types
def _kind(annotation: Any) -> tuple[str, bool, bool]:
    """(base type name, optional, is a list) of a dataclass field's annotation (written as a string)."""
    text = str(annotation).replace(" ", "")
    optional = "None" in text.split("|")
    base = "|".join(p for p in text.split("|") if p != "None")
    is_list = base.startswith(("list[", "tuple["))
    if is_list:
        base = base[base.index("[") + 1 : -1].split(",")[0]
    return base, optional, is_list


def _type_name(base: str, optional: bool, is_list: bool) -> str:
    names = {"int": "an integer", "float": "a number", "str": "a text", "bool": "true or false"}
    text = f"a list of {base} values" if is_list else names.get(base, base)
    return text + (" or null" if optional else "")


def _one(base: str, value: Any, from_text: bool) -> tuple[bool, Any]:
    if base == "bool":
        if isinstance(value, bool):
            return True, value
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return True, value.lower() in ("true", "yes", "on")
        return False, value
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if from_text and isinstance(value, str):
            try:
                return True, int(value)
            except ValueError:
                return False, value
        return False, value
    if base == "float":
        if _is_number(value):
            return True, float(value)
        if from_text and isinstance(value, str):
            try:
                return True, float(value)  # PyYAML reads 1e-4 (no dot) as a string
            except ValueError:
                return False, value
        return False, value
    if base == "str":
        return isinstance(value, str), value
    return True, value  # e.g. dict: not checked here


def coerce(f: dataclasses.Field, value: Any, from_text: bool = True) -> Any:
    """``value`` (from YAML or JSON) as field ``f``'s type, or ``OptionError``: a list or null for a number, a number
    for a list, ``true`` for an integer are refused, never passed on."""
    base, optional, is_list = _kind(f.type)
    if value is None:
        if optional:
            return None
        raise OptionError(f.name, value, _type_name(base, optional, is_list))
    if is_list:
        if not isinstance(value, (list, tuple)):
            raise OptionError(f.name, value, _type_name(base, optional, is_list))
        items = []
        for item in value:
            ok, item = _one(base, item, from_text)
            if not ok:
                raise OptionError(f.name, value, _type_name(base, optional, is_list))
            items.append(item)
        return type(value)(items) if isinstance(value, tuple) else items
    ok, converted = _one(base, value, from_text)
    if not ok:
        raise OptionError(f.name, value, _type_name(base, optional, is_list))
    return converted


def check_fields(obj: Any, names: Sequence[str] | None = None) -> None:
    """Check every field of the dataclass ``obj`` (type, then its ``check``), in one loop; raise ``OptionError``.
    Numbers are stored converted (an int where a float is asked becomes a float)."""
    for f in dataclasses.fields(obj):
        if names is not None and f.name not in names:
            continue
        value = coerce(f, getattr(obj, f.name), from_text=False)
        object.__setattr__(obj, f.name, value)
        constraint = f.metadata.get("check")
        if constraint is None or value is None:
            continue
        if not constraint.ok(value):
            raise OptionError(f.name, value, describe(f))


def describe(f: dataclasses.Field) -> str:
    """The "allowed" part of a field's help text ('' without a constraint)."""
    constraint = f.metadata.get("check")
    if constraint is None:
        return ""
    return _for_type(constraint.describe(), _kind(f.type)[0])


def _for_type(text: str, base: str) -> str:
    return text.replace("a finite number", "an integer") if base == "int" else text


def bad_values(f: dataclasses.Field) -> list[Any]:
    """Values that field ``f`` must refuse (for tests): a wrong type (a list for a single value, a number for a
    list, text for a number, null where null is not allowed) and one its constraint refuses."""
    base, optional, is_list = _kind(f.type)
    values: list[Any] = [7] if is_list else [["a", "b"]]
    if base in ("int", "float") and not is_list:
        values.append("many")
    if not optional:
        values.append(None)
    constraint = f.metadata.get("check")
    if constraint is not None:
        bad = constraint.bad()
        values.append(" " if base == "str" and not is_list and isinstance(bad, list) else bad)
    return values


def arg_type(convert, constraint, name: str):
    """An argparse ``type=`` that converts and checks with a table constraint (argparse names the option)."""

    def parse(text: str):
        value = convert(text)
        if not constraint.ok(value):
            allowed = _for_type(constraint.describe(), getattr(convert, "__name__", ""))
            raise argparse.ArgumentTypeError(f"{value!r} is not allowed: {allowed}")
        return value

    parse.__name__ = name
    return parse
