"""Which way a metric improves, decided once (as optuna's `StudyDirection` does): every comparison, sort and
"worst value" in the engine goes through `Direction`, never through `mode == "min"` written again."""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Iterable, Optional, TypeVar

T = TypeVar("T")


class Direction(str, enum.Enum):
    """`search.mode` as a type: `min` (lower is better, a loss) or `max` (higher is better)."""

    MIN = "min"
    MAX = "max"

    @classmethod
    def of(cls, mode: str | Direction) -> Direction:
        return cls(mode)

    @property
    def sign(self) -> float:
        """+1 for min, -1 for max: `sign * value` is lower when better."""
        return 1.0 if self is Direction.MIN else -1.0

    @property
    def worst(self) -> float:
        """A value every real one beats."""
        return math.inf if self is Direction.MIN else -math.inf

    @property
    def ascending(self) -> bool:
        """Sort order that puts the best first."""
        return self is Direction.MIN

    def is_better(self, value: float, than: Optional[float]) -> bool:
        """Whether `value` beats `than` strictly (anything beats None)."""
        return than is None or self.sign * value < self.sign * than

    def best(self, items: Iterable[T], key: Callable[[T], Any] = lambda item: item) -> T:
        """The best of `items` by `key` (the first of equals)."""
        return min(items, key=lambda item: self.sign * key(item))

    def best_first(self, items: Iterable[T], key: Callable[[T], Any] = lambda item: item) -> list[T]:
        """`items` sorted best first (stable)."""
        return sorted(items, key=lambda item: self.sign * key(item))
