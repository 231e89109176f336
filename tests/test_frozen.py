"""@frozen behaves as @dataclass(frozen=True): equality, hashing, repr, immutability."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.frozen import frozen


@dataclasses.dataclass(frozen=True)
class Plain:
    a: int
    b: tuple = ()
    c: str = dataclasses.field(default="", compare=False, repr=False)


@frozen
class Shared:
    a: int
    b: tuple = ()
    c: str = dataclasses.field(default="", compare=False, repr=False)


@frozen
class Other:
    a: int
    b: tuple = ()
    c: str = ""


@pytest.mark.parametrize("cls", [Plain, Shared])
def test_same_semantics_as_dataclass(cls) -> None:
    x, y = cls(1, (2,), "x"), cls(1, (2,), "y")
    assert x == y and hash(x) == hash(y)  # c is not compared (nor hashed)
    assert x != cls(2, (2,)) and x != Other(1, (2,)) and x != (1, (2,))
    assert repr(x) == f"{cls.__qualname__}(a=1, b=(2,))"
    assert {x, y, cls(3)} == {x, cls(3)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.a = 5
    assert dataclasses.replace(x, a=7).a == 7 and dataclasses.asdict(x)["c"] == "x"


def test_hash_matches_the_dataclass_one() -> None:
    assert hash(Shared(1, (2,), "z")) == hash(Plain(1, (2,), "q"))


def test_a_class_with_its_own_eq_is_refused() -> None:
    with pytest.raises(AssertionError, match="use @dataclass"):
        @frozen
        class Own:
            a: int

            def __eq__(self, other: object) -> bool:
                return True
