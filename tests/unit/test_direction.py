import math

import pytest

from lora_sweep.direction import Direction


@pytest.mark.parametrize("mode, best, ranked, worst", [
    ("min", 1.0, [1.0, 2.0, 3.0], math.inf),
    ("max", 3.0, [3.0, 2.0, 1.0], -math.inf),
])
def test_one_type_says_which_way_is_better(mode, best, ranked, worst):
    direction = Direction(mode)
    assert direction.best([2.0, 1.0, 3.0]) == best
    assert direction.best_first([2.0, 1.0, 3.0]) == ranked
    assert direction.worst == worst and direction.is_better(ranked[0], ranked[1])
    assert not direction.is_better(ranked[1], ranked[0]) and not direction.is_better(2.0, 2.0)
    assert direction.is_better(ranked[-1], None)  # anything beats no value yet
    assert direction.is_better(ranked[-1], worst)
    assert sorted([2.0, 1.0, 3.0], reverse=not direction.ascending) == ranked
    assert direction.sign * ranked[0] < direction.sign * ranked[1]


def test_ties_keep_their_order_and_nan_never_wins():
    items = [("a", 1.0), ("b", 1.0), ("c", 0.5)]
    assert Direction.MAX.best(items, key=lambda item: item[1])[0] == "a"
    assert [name for name, _ in Direction.MAX.best_first(items, key=lambda item: item[1])] == ["a", "b", "c"]
    assert not Direction.MIN.is_better(math.nan, 1.0) and not Direction.MAX.is_better(math.nan, 1.0)


def test_a_config_gives_its_direction(raw_config):
    from lora_sweep.config import SweepConfig

    raw_config["search"]["mode"] = "max"
    raw_config["search"]["metric"] = "eval_perplexity"
    assert SweepConfig.model_validate(raw_config).direction is Direction.MAX
