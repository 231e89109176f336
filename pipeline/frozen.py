"""`@frozen`: `@dataclass(frozen=True)` with shared `__eq__`, `__hash__` and `__repr__`.

dataclass() writes each method it adds as source and compiles it: a frozen class with eq gets
six (~0.9 ms), and `fsr-pipe status` imports ~30 such classes (config sections, records,
plans), a fifth of its start-up budget (docs/benchmarks.md, CLI start-up). With these three
shared, a class costs ~0.35 ms. They behave as dataclass's own: instances of the same class
compare and hash by the tuple of their compare=True fields; repr shows the repr=True ones.
Used by the modules the CLI imports at start-up; elsewhere plain dataclasses are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def frozen(cls: T) -> T:
    cls = dataclass(frozen=True, repr=False, eq=False)(cls)
    assert not {"__eq__", "__hash__", "__repr__"} & set(vars(cls)), \
        f"{cls.__name__} defines its own __eq__/__hash__/__repr__: use @dataclass"
    cls.__eq__ = _eq
    cls.__hash__ = _hash
    cls.__repr__ = _repr
    return cls


def _compared(obj: Any) -> tuple:
    return tuple(getattr(obj, f.name) for f in fields(obj) if f.compare)


def _eq(self: Any, other: Any) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _compared(self) == _compared(other)


def _hash(self: Any) -> int:
    return hash(tuple(getattr(self, f.name) for f in fields(self)
                      if (f.compare if f.hash is None else f.hash)))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
    return f"{self.__class__.__qualname__}({shown})"
