"""Where a meta-iteration's time goes, by kind of operation (used by peers.py --profile).

torch.profiler records every aten op of a few meta-iterations; each op's *self* CPU time
(its own time, not its children's, so nothing is counted twice) is added to a category by
the op's name. Ops run on task-parallel worker threads are included, so with several
threads the sum is CPU time, which can exceed the wall time. Contenders are profiled in paired
rounds (one call each per round, rotating order) and each category's median is kept.

The bound this gives: if a contender's convolutions alone take C ms per iteration and the
baseline's whole iteration takes B ms, the contender can be at most B / C times faster than
the baseline without faster convolution kernels, however cheap everything else becomes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from torch.profiler import ProfilerActivity, profile

#: (category, prefixes of the "_"-separated words of aten op names), first match wins;
#: the rest is "other".
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolution", ("conv", "mkldnn")),
    ("batch norm", ("batch",)),
    ("matmul", ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear")),
    ("pooling", ("pool",)),
    ("elementwise", ("add", "mul", "sub", "div", "relu", "threshold", "where", "neg", "sqrt")),
    ("reduction", ("sum", "mean", "var", "max", "min", "softmax", "nll", "cross")),
    ("copy and layout", ("copy", "contiguous", "clone", "cat", "stack", "to", "empty", "fill")),
)


def category(op_name: str) -> str:
    """The category of an aten op name such as ``aten::mkldnn_convolution``: the first
    whose prefixes start one of the name's words."""
    words = op_name.removeprefix("aten::").split("_")
    for label, prefixes in CATEGORIES:
        if any(word.startswith(prefixes) for word in words if word):
            return label
    return "other"


def profile_once(step: Callable[[], None]) -> dict[str, float]:
    """Self CPU milliseconds of one call of `step` by category, plus ``total`` and ``ops``
    (the op calls)."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    by_category: dict[str, float] = {}
    calls = 0
    for event in profiler.key_averages():
        if not event.key.startswith("aten::"):
            continue
        label = category(event.key)
        by_category[label] = by_category.get(label, 0.0) + event.self_cpu_time_total / 1e3
        calls += event.count
    by_category["total"] = sum(by_category.values())
    by_category["ops"] = float(calls)
    return by_category


def profile_paired(steps: Sequence[Callable[[], None]], rounds: int = 3) -> list[dict[str, float]]:
    """Per step, the median over `rounds` of `profile_once`, each category separately. Each
    step runs once unprofiled first; then every round profiles one call of each step in an
    order rotating from round to round, so a slow spell of a shared machine hits all."""
    for step in steps:
        step()
    samples: list[list[dict[str, float]]] = [[] for _ in steps]
    for round_index in range(rounds):
        for offset in range(len(steps)):
            which = (round_index + offset) % len(steps)
            samples[which].append(profile_once(steps[which]))
    medians = []
    for runs in samples:
        labels = {label for run in runs for label in run}
        medians.append(
            {label: statistics.median(run.get(label, 0.0) for run in runs) for label in labels}
        )
    return medians


def print_profiles(names: Sequence[str], profiles: Sequence[dict[str, float]]) -> None:
    """A table: one row per category, per contender its ms per iteration and share."""
    labels = [label for label, _ in CATEGORIES] + ["other", "total"]
    header = f"{'category':<16}" + "".join(f"{name:>28}" for name in names)
    print(header)
    print("-" * len(header))
    for label in labels:
        cells = []
        for prof in profiles:
            ms = prof.get(label, 0.0)
            cells.append(f"{ms:10.1f} ms ({100 * ms / prof['total']:5.1f}%)")
        print(f"{label:<16}" + "".join(f"{cell:>28}" for cell in cells))
    print(f"{'op calls':<16}" + "".join(f"{prof['ops']:>28.0f}" for prof in profiles))


def convolution_bound(baseline: dict[str, float], contender: dict[str, float]) -> float:
    """The largest speedup over the baseline the contender could reach with everything but
    its convolutions free: baseline total / contender convolution time."""
    return baseline["total"] / max(contender.get("convolution", 0.0), 1e-9)
