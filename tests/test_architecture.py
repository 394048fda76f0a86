"""The package's layering, read from the code's imports: no import cycle, no import from a
lower layer up to a higher one, and stages that import only what they use.

The layers (`LAYERS`, drawn in docs/architecture.md) go bottom-up; a module may import
from its own layer and the layers below it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from import_graph import MODULES, ROOT, closure, find_cycle, graph, imported_modules

STAGES = ROOT / "stages"

LAYERS: list[set[str]] = [
    # plumbing every layer may use; decides no number
    {
        "metalab.errors",
        "metalab.schema",
        "metalab.io",
        "metalab.runtime",
        "metalab.device",
        "metalab.layout",
    },
    # data, networks, the RL track, metrics schemas, checkpoints, MLflow
    {
        "metalab.data",
        "metalab.models",
        "metalab.rl",
        "metalab.records",
        "metalab.statistics",
        "metalab.checkpoints",
        "metalab.tracking",
        "metalab.tracking_store",
    },
    # one module per learner family behind `algorithms.base`
    {"metalab.algorithms"},
    # params.yaml assembled from the schemas below; the model-file API; torchrun helpers
    {"metalab.params", "metalab.learner_api", "metalab.distributed"},
    {"metalab.evaluation"},
    {"metalab.training"},
    {"metalab.report"},
    # entry points
    {
        "metalab.cli",
        "metalab.ui",
        "metalab.mlflow_model",
        "metalab.smoke",
        "metalab.repro",
        "metalab.tuning",
        "metalab",
    },
]


def layer_of(module: str) -> int:
    """The index of the layer `module` belongs to (its longest listed prefix)."""
    best, best_length = None, -1
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and the README)"
    return best


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "\n".join(upward)


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_source_module_is_over_500_lines():
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, long


def stage_closure(stage: str) -> set[str]:
    edges = graph(module_level_only=True)
    return closure(imported_modules(STAGES / f"{stage}.py", module_level_only=True), edges)


@pytest.mark.parametrize("stage", ["download", "prefetch", "episodes"])
def test_data_stages_import_no_learner_code(stage):
    reached = stage_closure(stage)
    heavy = sorted(
        m for m in reached if m.startswith(("metalab.models", "metalab.algorithms", "metalab.rl"))
    )
    assert not heavy, f"stages/{stage}.py reaches {heavy}"
    assert "metalab.params" not in reached  # the data stages read only the data sections


def test_download_stage_does_not_load_torch():
    """Run for real: importing the download stage loads neither torch nor learner code."""
    probe = (
        "import runpy, sys\n"
        f"runpy.run_path({str(STAGES / 'download.py')!r}, run_name='not_main')\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith("
        "('metalab.models', 'metalab.algorithms', 'metalab.rl'))]\n"
        "print(','.join(sorted(loaded)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == ""


def test_rl_stages_import_no_vision_learners():
    for stage in ("train_rl", "evaluate_rl"):
        reached = stage_closure(stage)
        assert not any(
            m.startswith("metalab.algorithms.") for m in reached - {"metalab.algorithms.registry"}
        ), stage
