"""The plain values that cross the API: a routing decision and a finished generation.

A leaf module (it imports nothing of quantrouter) so that `quantrouter.client` can hand these to
callers without loading the router, the `ollama` client or `prometheus_client`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from operator import attrgetter
from typing import Any, ParamSpec, TypeVar, cast

__all__ = ["Assessment", "Completion", "Decision", "FailureKind", "Preference", "Variant", "quick_constructor",
           "quick_replacer"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Preference(enum.Enum):
    QUALITY = "quality"
    BALANCED = "balanced"
    LATENCY = "latency"


class FailureKind(enum.Enum):
    """Why no candidate was chosen: the status the service answers with follows from it."""

    MEMORY = "memory"  # RESOURCE_EXHAUSTED: only memory stood in the way
    CONSTRAINTS = "constraints"  # FAILED_PRECONDITION: explicit constraints or failures ruled all out
    DEADLINE = "deadline"  # DEADLINE_EXCEEDED: the deadline alone ruled every variant out (predicted)
    EMPTY = "empty"  # NOT_FOUND: the family has no variants


@dataclass(frozen=True, slots=True)
class Assessment:
    """One candidate as the policy saw it: its numbers and, when rejected, why."""

    tag: str
    quantization: str
    memory_bytes: int
    resident: bool
    tokens_per_second: float
    measured: bool
    time_to_first_token: float
    expected_seconds: float
    quality: float
    score: float = 0.0
    rejection: str = ""
    memory_only: bool = False
    # The node holding the candidate, when a fleet router decided.
    node: str = ""
    queue_seconds: float = 0.0  # the GPU backlog this request would wait behind, inside the expected time
    churn_seconds: float = 0.0  # reload time its load would cost evicted siblings' next users (ranked on)
    at_risk: bool = False  # the backlog puts its expected time past the deadline, or its rate below the floor
    quality_measured: bool = False
    endangers: int = 0  # in-flight requests its new runner would push past their deadline or rate floor
    held_back: str = ""  # why it ranks after candidates that are not (empty when it does not)

    @property
    def feasible(self) -> bool:
        return not self.rejection


@dataclass(frozen=True, slots=True)
class Decision:
    family: str
    preference: Preference
    chosen: Assessment | None
    reason: str
    candidates: tuple[Assessment, ...] = field(default_factory=tuple)
    downgraded: bool = False
    pinned: bool = False
    fallback: bool = False
    failure: FailureKind | None = None
    memory_source: str = "static"
    free_bytes: int = 0
    # The node that serves the request, when a fleet router decided.
    node: str = ""
    best_expected_seconds: float = 0.0  # when nothing was chosen: the smallest expected time among candidates

    @property
    def reason_code(self) -> str:
        """A bounded label for metrics."""
        if self.chosen is None:
            return f"no_fit_{self.failure.value}" if self.failure else "no_fit"
        if self.pinned:
            return "pinned"
        if self.fallback:
            return "fallback"
        if self.downgraded:
            return "downgraded"
        return self.preference.value


@dataclass(frozen=True, slots=True)
class Completion:
    variant: str
    prompt_tokens: int
    generated_tokens: int
    tokens_per_second: float
    prompt_tokens_per_second: float
    time_to_first_token: float
    load_seconds: float
    total_seconds: float
    done_reason: str


@dataclass(frozen=True, slots=True)
class Variant:
    """One row of a variant listing: what the backend holds and the speed the policy would use for it."""

    tag: str
    quantization: str
    size_bytes: int
    parameter_count: int
    resident: bool
    vram_bytes: int
    tokens_per_second: float
    measured: bool
    samples: int
    quality: float
    quality_measured: bool = False  # measured by `calibrate --quality`, else the quant type's prior


def quick_constructor(cls: Callable[_P, _T]) -> Callable[_P, _T]:
    """`cls(...)` for a frozen slots dataclass `cls`, about three times cheaper, for values built on every request.

    A frozen dataclass's `__init__` sets each field through `object.__setattr__` (≈0.2 µs a field on this
    machine), which made building the 17-field `Assessment`s most of a decision's time. This returns a mutable
    twin with the same slots in the same order whose `__init__` ends by handing the instance to `cls`: CPython
    allows `__class__` assignment between heap types of one layout, so what it builds is an ordinary `cls`,
    equal to `cls(...)` and as frozen.
    """
    if not isinstance(cls, type):
        raise TypeError(f"{cls!r} is not a dataclass type")
    target = cls

    def hand_over(self: object) -> None:
        object.__setattr__(self, "__class__", target)

    twin = make_dataclass(f"_{cls.__name__}Draft", [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory)) for f in fields(cls)],
        namespace={"__post_init__": hand_over}, slots=True)
    return cast(Callable[_P, _T], twin)


def quick_replacer(cls: type[_T]) -> Callable[..., _T]:
    """`dataclasses.replace` for a frozen slots dataclass `cls` at a fraction of its cost: the fields read in one
    C call, the changed ones put in place, the value built positionally (`quick_constructor`). A fleet choice over
    a few nodes made dozens of replaces, and they were half of its time."""
    names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    get = attrgetter(*names)
    position = {name: i for i, name in enumerate(names)}
    new: Callable[..., _T] = quick_constructor(cls)

    def replaced(value: _T, **changes: Any) -> _T:
        row = list(get(value))
        for name, change in changes.items():
            row[position[name]] = change
        return new(*row)

    return replaced
