"""The learner contract: the trainer, the torchrun helpers and the learner API read only
what `MetaLearner` declares, and every registered learner honours those declarations."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from metalab.algorithms.base import BuildContext, MetaLearner
from metalab.algorithms.registry import ALGORITHMS, build_learner, options_class
from metalab.models.config import ModelConfig

SOURCE = Path(__file__).resolve().parents[1] / "src" / "metalab"
# Where each reader holds a learner: (file, expressions that are a MetaLearner there).
READERS = {
    "training.py": {"self.learner"},
    "learner_api.py": {"meta_learner", "self.meta_learner"},
    "distributed.py": {"learner"},
}


def attributes_read(path: Path, holders: set[str]) -> set[str]:
    """Names read as ``<holder>.<name>`` in `path`, for each expression in `holders`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in holders:
            names.add(node.attr)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr"):
            target = ast.unparse(node.args[0]) if node.args else ""
            assert target not in holders, f"{path.name} probes a learner with {ast.unparse(node)}"
    return names


@pytest.mark.parametrize("file", sorted(READERS))
def test_readers_use_only_declared_attributes(file):
    declared = set(dir(MetaLearner)) | set(MetaLearner.__annotations__)
    undeclared = attributes_read(SOURCE / file, READERS[file]) - declared
    assert not undeclared, f"{file} reads undeclared learner attributes {sorted(undeclared)}"


def test_attribute_scan_sees_an_undeclared_read(tmp_path):
    planted = tmp_path / "reader.py"
    planted.write_text("def f(self):\n    return self.learner.secret_steps\n")
    assert attributes_read(planted, {"self.learner"}) == {"secret_steps"}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_learner_honours_the_contract(algorithm):
    torch.manual_seed(0)
    options = options_class(algorithm)()
    context = BuildContext(model=ModelConfig(hidden=4), n_way=5, image_size=28)
    learner = build_learner(algorithm, options, context)
    assert isinstance(learner, MetaLearner) and isinstance(learner, nn.Module)
    assert learner.algorithm == algorithm
    assert isinstance(learner.adapts_by_gradient, bool)
    steps = learner.default_adaptation_steps
    if learner.adapts_by_gradient:
        assert isinstance(steps, int) and steps >= 0
    else:
        assert steps is None
    assert learner.outer_optimizer in (None, "adam", "sgd")
    assert learner.outer_lr is None or learner.outer_lr > 0
    assert learner.train_n_way is None or learner.train_n_way >= 2
    assert isinstance(learner.combines_tasks_by_mean, bool)
    assert isinstance(learner.model, nn.Module) and hasattr(learner.model, "body")
    groups = learner.parameter_groups()
    assert groups and all(group["params"] for group in groups)
    assert isinstance(learner.batches_tasks, bool)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_adapt_many_predicts_what_adapt_predicts_task_by_task(algorithm):
    """`adapt_many` on T tasks gives logits [T, Q, N], task t those of `adapt` on task t
    (float rounding apart: a vectorised pass sums in another order; tests/
    test_batched_evaluation.py holds the tight comparisons). A learner that declares
    ``batches_tasks`` overrides `adapt_many` and draws no random numbers at test time, so
    evaluating episodes in chunks rather than one by one cannot shift any random draw; one
    that does not adapts task by task (the same draws and logits as `adapt` in a loop)."""
    torch.manual_seed(0)
    context = BuildContext(model=ModelConfig(hidden=4), n_way=5, image_size=28)
    learner = build_learner(algorithm, options_class(algorithm)(), context).eval()
    generator = torch.Generator().manual_seed(1)
    support_x = torch.rand(3, 10, 1, 28, 28, generator=generator)
    support_y = torch.arange(5).repeat_interleave(2).repeat(3, 1)
    query_x = torch.rand(3, 15, 1, 28, 28, generator=generator)

    state = torch.get_rng_state()
    batched = learner.adapt_many(support_x, support_y)(query_x)
    after_batched = torch.get_rng_state()
    torch.set_rng_state(state)
    one_by_one = torch.stack(
        [learner.adapt(x, y)(q) for x, y, q in zip(support_x, support_y, query_x, strict=True)]
    )

    assert batched.shape == (3, 15, 5)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4)
    if learner.batches_tasks:
        assert type(learner).adapt_many is not MetaLearner.adapt_many
        assert torch.equal(after_batched, state), (
            f"{algorithm} batches tasks but draws random numbers at test time"
        )
    else:  # the loop over `adapt`: the same random numbers, the same logits
        assert torch.equal(after_batched, torch.get_rng_state())
        assert torch.equal(batched, one_by_one)
