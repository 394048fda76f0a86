"""docs/architecture.md's worked example is real: its learner module, registered with its
one registry line and configured by its params.yaml entry, trains and adapts."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from synthetic import build_context, class_patterns, sample_episodes

from metalab.algorithms import registry
from metalab.algorithms.base import MetaLearner, TrainProgress
from metalab.params import validate_params

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def example_algorithm(tmp_path, monkeypatch):
    """The doc's module, importable as ``metalab_doc_example.cosine_nn`` and registered by
    the doc's registry line."""
    module_source, registry_line = blocks("python")
    package = tmp_path / "metalab_doc_example"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cosine_nn.py").write_text(module_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, module = re.fullmatch(r'\s*"(\w+)": "([\w.]+)",\s*', registry_line).groups()
    module = module.replace("metalab.algorithms", "metalab_doc_example")
    monkeypatch.setitem(registry.ALGORITHMS, name, module)
    yield name
    sys.modules.pop(module, None)
    sys.modules.pop("metalab_doc_example", None)


def test_documented_learner_trains_and_adapts(example_algorithm):
    (entry,) = blocks("yaml")
    params = validate_params({"experiments": yaml.safe_load(entry)})
    experiment = params.experiment(example_algorithm)
    assert type(experiment.options).__module__.endswith("cosine_nn")  # typed at load
    torch.manual_seed(0)
    learner = registry.build_learner(experiment.algorithm, experiment.options, build_context())
    assert isinstance(learner, MetaLearner) and learner.algorithm == example_algorithm
    episodes = sample_episodes(class_patterns(10, seed=0), 3, 5, 2, 3, seed=1)
    stats = learner.meta_gradients(episodes, TrainProgress(0, 1))
    assert 0.0 <= stats.accuracy <= 1.0 and torch.isfinite(torch.tensor(stats.loss))
    grads = [p.grad for p in learner.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    # any way count: a 3-way task from the first three classes of the first episode
    support = episodes.support_y[0] < 3
    predict = learner.adapt(episodes.support_x[0][support], episodes.support_y[0][support])
    assert predict(episodes.query_x[0]).shape == (episodes.query_x.shape[1], 3)


def test_the_example_is_not_shipped():
    """The doc's learner is an example: registering it is the reader's step."""
    assert "cosine_nn" not in registry.ALGORITHMS
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("metalab.algorithms.cosine_nn")


def test_every_registered_algorithm_module_is_named_with_the_seed_aliases():
    """The doc's table names each algorithm's module and the seed's old names beside the
    new ones (the params refuse the old names, the doc says what they became)."""
    text = DOC.read_text()
    for name, module in registry.ALGORITHMS.items():
        assert f"`{module.rsplit('.', 1)[1]}`" in text, name
    for old in (*registry.RENAMED_ALGORITHMS, *registry.RENAMED_OPTIONS):
        assert f"once `{old}`" in text, old
