"""The multiple-choice knapsack against brute force: exact optimum, budget never exceeded, clear errors."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcompiler.core.errors import ConfigError
from qcompiler.tools.autotune.knapsack import solve

option = st.tuples(st.integers(0, 60), st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False))
instances = st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=6)


def brute_force(options, budget):
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in options)):
        cost = sum(options[i][k][0] for i, k in enumerate(choice))
        value = sum(options[i][k][1] for i, k in enumerate(choice))
        if cost <= budget and (best is None or value < best):
            best = value
    return best


@given(instances, st.integers(0, 400))
def test_the_optimum_equals_brute_force_and_never_exceeds_the_budget(options, budget):
    best = brute_force(options, budget)
    if best is None:
        with pytest.raises(ConfigError, match="cheapest option of every layer"):
            solve(options, budget)
        return
    solution = solve(options, budget)
    assert solution.cost <= budget
    assert solution.cost == sum(options[i][k][0] for i, k in enumerate(solution.choices))
    assert solution.value == pytest.approx(sum(options[i][k][1] for i, k in enumerate(solution.choices)))
    assert solution.value == pytest.approx(best, abs=1e-9)


@given(st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=6), st.data())
def test_a_budget_at_the_cheapest_assignment_takes_the_cheapest_options(options, data):
    cheapest = sum(min(c for c, _ in layer) for layer in options)
    solution = solve(options, cheapest)
    assert solution.cost == cheapest
    with pytest.raises(ConfigError, match=f"{cheapest} bits"):
        solve(options, cheapest - 1 - data.draw(st.integers(0, 5)))


def test_many_layers_with_ties_and_dominated_options_solve_exactly():
    # 40 layers of 5 options where equal costs and dominated options abound: the frontier stays small
    layers = [[(8, 0.0), (4, 0.1 + (i % 3) / 100), (4, 0.5), (3, 0.4 + (i % 7) / 50), (9, 0.2)] for i in range(40)]
    budget = 40 * 4 + 20
    solution = solve(layers, budget)
    assert solution.cost <= budget
    # 20 extra bits: the layers with the largest 4 -> 8 saving (i % 3 == 2 first) go to 8 bits, five of them
    upgraded = [i for i, k in enumerate(solution.choices) if k == 0]
    assert len(upgraded) == 5 and all(i % 3 == 2 for i in upgraded)
    # the 3-bit option is cheaper still but worse: never needed at this budget
    assert all(k in (0, 1) for k in solution.choices)


def test_bad_instances_are_errors_that_say_what_is_wrong():
    with pytest.raises(ConfigError, match="layer 1 has no options"):
        solve([[(1, 0.0)], []], 10)
    with pytest.raises(ConfigError, match="integers of bits"):
        solve([[(1.5, 0.0)]], 10)
    with pytest.raises(ConfigError, match="not a finite number"):
        solve([[(1, float("nan"))]], 10)
    with pytest.raises(ConfigError, match="integer number of bits"):
        solve([[(1, 0.0)]], 10.0)


latencies = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)


@given(instances, st.integers(0, 400), st.data())
def test_under_a_latency_budget_both_budgets_hold_and_the_gap_bounds_the_optimum(options, budget, data):
    from qcompiler.tools.autotune.knapsack import solve_with_latency

    times = [[data.draw(latencies) for _ in layer] for layer in options]
    limit = data.draw(st.floats(0.0, float(len(options)), allow_nan=False))
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in options)):
        cost = sum(options[i][k][0] for i, k in enumerate(choice))
        t = sum(times[i][k] for i, k in enumerate(choice))
        value = sum(options[i][k][1] for i, k in enumerate(choice))
        if cost <= budget and t <= limit + 1e-9 * max(1.0, limit) and (best is None or value < best):
            best = value
    if best is None:
        with pytest.raises(ConfigError, match="cheapest option of every layer|meets the latency budget"):
            solve_with_latency(options, budget, times, limit)
        return
    solution = solve_with_latency(options, budget, times, limit)
    assert solution.cost <= budget and solution.latency <= limit + 1e-9 * max(1.0, limit)
    assert solution.value >= best - 1e-9  # feasible, so never below the optimum
    assert solution.bound <= best + 1e-9 and solution.gap >= solution.value - best - 1e-9  # the stated gap holds
    if solution.multiplier == 0.0:  # the latency budget did not bind: the exact bits optimum
        assert solution.value == pytest.approx(brute_force(options, budget), abs=1e-9)


def test_a_latency_budget_below_the_fastest_assignment_names_it():
    from qcompiler.tools.autotune.knapsack import solve_with_latency

    with pytest.raises(ConfigError, match="the fastest reaches 1.5"):
        solve_with_latency([[(8, 0.0), (4, 1.0)], [(8, 0.0), (4, 1.0)]], 16, [[1.0, 0.75], [1.0, 0.75]], 1.2)
    with pytest.raises(ConfigError, match="one number per option"):
        solve_with_latency([[(8, 0.0)]], 16, [[1.0, 2.0]], 1.0)
