"""The exact multiple-choice knapsack: one option per layer, least summed sensitivity, total bits <= budget.

Method: dynamic programming over the layers on a Pareto frontier of partial assignments (exact integer
bit cost, summed sensitivity), with two prunings that never drop an optimal assignment:

- **dominance**: of two partial assignments of the same layers, one costing no fewer bits and no less
  sensitive than the other is dropped (any completion of it completes the other at least as well);
- **bounds**: a partial assignment is dropped when no completion fits the budget (the rest of the layers
  at their cheapest), or when a lower bound of its best completion is above the value of a feasible
  assignment found first (an incumbent). The bound is the Lagrangian relaxation at the multiplier of the
  LP relaxation: for any ``lam >= 0`` the rest costs at least
  ``sum_j min_c (s_jc + lam * b_jc) - lam * (bits left)`` (weak duality).

The incumbent and the multiplier come from the LP relaxation's greedy (each layer's lower convex hull,
upgrades taken in order of sensitivity saved per bit). Memory: one (parent, option) pair per frontier
state per layer, to read the optimum back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qcompiler.core.errors import ConfigError


@dataclass(frozen=True)
class Solution:
    choices: tuple[int, ...]  # per layer, the index of the chosen option
    cost: int  # summed bits of the chosen options
    value: float  # summed sensitivity of the chosen options
    states: int  # largest frontier kept (how hard the instance was)


def _check(options: Sequence[Sequence[tuple[int, float]]], budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ConfigError(f"knapsack budget must be an integer number of bits, got {budget!r}")
    for i, layer in enumerate(options):
        if not layer:
            raise ConfigError(f"knapsack layer {i} has no options: every layer needs at least one")
        for cost, value in layer:
            if isinstance(cost, bool) or not isinstance(cost, (int, np.integer)) or cost < 0:
                raise ConfigError(f"knapsack layer {i}: costs must be integers of bits >= 0, got {cost!r}")
            if not np.isfinite(value):
                raise ConfigError(f"knapsack layer {i}: sensitivity {value!r} is not a finite number")


def _hull(layer: Sequence[tuple[int, float]]) -> list[tuple[int, int, float]]:
    """The lower convex hull of ``(cost, value)`` from the cheapest option: ``(index, cost, value)``,
    cost rising and value falling."""
    order = sorted(range(len(layer)), key=lambda k: (layer[k][0], layer[k][1]))
    front: list[tuple[int, int, float]] = []
    for k in order:
        cost, value = layer[k]
        if front and value >= front[-1][2]:
            continue  # dominated: costs at least as much, no less sensitive
        while len(front) >= 2:
            (_, c1, v1), (_, c2, v2) = front[-2], front[-1]
            if (v2 - v1) * (cost - c1) >= (value - v1) * (c2 - c1):  # front[-1] on or above the chord
                front.pop()
            else:
                break
        front.append((k, int(cost), float(value)))
    return front


def _greedy(options, budget: int) -> tuple[float, list[int]]:
    """The LP relaxation's greedy: the multiplier ``lam`` (sensitivity saved per bit of the first upgrade
    that does not fit; 0 when all fit) and a feasible assignment (the upgrades that fit, in order)."""
    hulls = [_hull(layer) for layer in options]
    choice = [h[0][0] for h in hulls]
    spent = sum(h[0][1] for h in hulls)
    upgrades = []
    for i, h in enumerate(hulls):
        for step in range(1, len(h)):
            (_, c0, v0), (k, c1, v1) = h[step - 1], h[step]
            upgrades.append(((v1 - v0) / (c1 - c0), i, step, k, c1 - c0))
    upgrades.sort(key=lambda u: (u[0], u[1], u[2]))
    lam, blocked, at = 0.0, set(), [0] * len(hulls)
    for slope, i, step, k, extra in upgrades:
        if i in blocked or at[i] != step - 1:
            continue
        if spent + extra > budget:
            if not blocked:
                lam = -slope
            blocked.add(i)
            continue
        spent += extra
        choice[i], at[i] = k, step
    return lam, choice


def solve(options: Sequence[Sequence[tuple[int, float]]], budget: int) -> Solution:  # long: one DP loop
    """The assignment (one option per layer) of least summed value whose summed cost is at most ``budget``.

    ``options[i]`` lists layer ``i``'s ``(bits, sensitivity)`` pairs. Exact (see the module docstring).
    Raises :class:`ConfigError` when even the cheapest option of every layer exceeds the budget."""
    _check(options, budget)
    budget = int(budget)
    costs = [np.array([c for c, _ in layer], dtype=np.int64) for layer in options]
    values = [np.array([v for _, v in layer], dtype=np.float64) for layer in options]
    n = len(options)
    cheapest = sum(int(c.min()) for c in costs)
    if cheapest > budget:
        raise ConfigError(f"no assignment fits {budget} bits: the cheapest option of every layer sums to "
                          f"{cheapest} bits; raise the budget to at least that")
    lam, incumbent = _greedy(options, budget)
    upper = sum(float(values[i][k]) for i, k in enumerate(incumbent))
    tolerance = 1e-9 * (1.0 + abs(upper)) + 1e-12 * n
    rest_cost = np.zeros(n + 1, dtype=np.int64)  # cheapest bits of layers i.. n-1
    rest_bound = np.zeros(n + 1)  # sum over layers i.. of min_c (s + lam * b)
    for i in range(n - 1, -1, -1):
        rest_cost[i] = rest_cost[i + 1] + int(costs[i].min())
        rest_bound[i] = rest_bound[i + 1] + float((values[i] + lam * costs[i]).min())
    frontier_cost, frontier_value = np.zeros(1, dtype=np.int64), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    largest = 1
    for i in range(n):
        k = len(costs[i])
        cost = (frontier_cost[:, None] + costs[i][None, :]).ravel()
        value = (frontier_value[:, None] + values[i][None, :]).ravel()
        parent = np.repeat(np.arange(len(frontier_cost)), k)
        option = np.tile(np.arange(k), len(frontier_cost))
        bound = value + rest_bound[i + 1] - lam * (budget - cost)
        keep = (cost + rest_cost[i + 1] <= budget) & (bound <= upper + tolerance)
        cost, value, parent, option = cost[keep], value[keep], parent[keep], option[keep]
        order = np.lexsort((value, cost))
        cost, value, parent, option = cost[order], value[order], parent[order], option[order]
        best_before = np.minimum.accumulate(value)
        pareto = np.ones(len(value), dtype=bool)
        pareto[1:] = value[1:] < best_before[:-1]
        frontier_cost, frontier_value = cost[pareto], value[pareto]
        back.append((parent[pareto], option[pareto]))
        largest = max(largest, len(frontier_cost))
    state = int(np.argmin(frontier_value))
    choices = [0] * n
    for i in range(n - 1, -1, -1):
        parents, chosen = back[i]
        choices[i] = int(chosen[state])
        state = int(parents[state])
    total_cost = sum(int(costs[i][k]) for i, k in enumerate(choices))
    total_value = float(sum(values[i][k] for i, k in enumerate(choices)))
    return Solution(tuple(choices), total_cost, total_value, largest)


@dataclass(frozen=True)
class LatencySolution:
    choices: tuple[int, ...]
    cost: int  # summed bits
    value: float  # summed sensitivity
    latency: float  # summed latency of the chosen options
    bound: float  # a lower bound of the best value meeting both budgets (Lagrangian dual)
    multiplier: float  # the latency price the answer was found at (0: the latency budget did not bind)

    @property
    def gap(self) -> float:
        """How far ``value`` may be above the optimum (0 when the latency budget did not bind)."""
        return max(0.0, self.value - self.bound)


def solve_with_latency(options: Sequence[Sequence[tuple[int, float]]], budget: int,
                       latencies: Sequence[Sequence[float]], latency_budget: float,
                       steps: int = 40) -> LatencySolution:
    """The assignment of least summed value within ``budget`` bits *and* ``latency_budget`` summed latency.

    The bits constraint is kept exactly (:func:`solve`); the latency constraint is priced in (Lagrangian
    relaxation: values ``s + mu * t``, ``mu`` found by bisection) and every answer meets it. The
    answer's distance to the optimum is at most :attr:`LatencySolution.gap` (weak duality: for every
    ``mu >= 0`` the priced optimum less ``mu * latency_budget`` is a lower bound). A latency budget no
    assignment within the bits budget meets is a :class:`ConfigError` naming the least reachable latency."""
    if len(latencies) != len(options) or any(len(t) != len(o) for t, o in zip(latencies, options)):
        raise ConfigError("knapsack latencies must give one number per option of every layer")
    if not all(np.isfinite(x) and x >= 0 for t in latencies for x in t):
        raise ConfigError("knapsack latencies must be finite numbers >= 0")

    def priced(mu: float):
        return solve([[(c, v + mu * t) for (c, v), t in zip(layer, lat)] for layer, lat in zip(options, latencies)],
                     budget)

    def measured(sol: Solution):
        value = float(sum(options[i][k][1] for i, k in enumerate(sol.choices)))
        latency = float(sum(latencies[i][k] for i, k in enumerate(sol.choices)))
        return value, latency

    def answer(sol: Solution, mu: float, bound: float) -> LatencySolution:
        value, latency = measured(sol)
        return LatencySolution(sol.choices, sol.cost, value, latency, bound, mu)

    free = priced(0.0)
    value, latency = measured(free)
    slack = 1e-9 * max(1.0, abs(latency_budget))  # summation order: the same sums may differ in the last bits
    if latency <= latency_budget + slack:
        return answer(free, 0.0, value)
    fastest = solve([[(c, t) for (c, _), t in zip(layer, lat)] for layer, lat in zip(options, latencies)], budget)
    least = measured(fastest)[1]
    if least > latency_budget + slack:
        raise ConfigError(f"no assignment within {budget} bits meets the latency budget {latency_budget:.6g}: the "
                          f"fastest reaches {least:.6g} (every layer on its fastest option that fits the bits); "
                          "raise the latency budget or the bits budget")
    spread = sum(max(v for _, v in layer) - min(v for _, v in layer) for layer in options)
    lo, hi = 0.0, max(1e-12, spread / max(latency - least, 1e-30))
    best, bound = None, value - 0.0
    sol = priced(hi)
    while measured(sol)[1] > latency_budget + slack:  # the price at which the answer is fast enough
        lo, hi = hi, hi * 4
        sol = priced(hi)
    for mu, s in ((hi, sol),) + tuple((None, None) for _ in range(steps)):
        if mu is None:
            mu = (lo + hi) / 2
            s = priced(mu)
        v, t = measured(s)
        bound = max(bound, s.value - mu * latency_budget)
        if t <= latency_budget + slack:
            hi = mu
            if best is None or v < best[1]:
                best = (s, v, mu)
        else:
            lo = mu
    return answer(best[0], best[2], min(bound, best[1]))
