"""dvc.yaml tells the truth about code: every source file a stage's script can run is a
dependency of that stage, derived here from the code's imports, so a change to it reruns
the stage. Modules that cannot change a number are exempt (`PLUMBING`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from import_graph import MODULES, ROOT, closure, graph, imported_modules

# Modules that decide no number and write no result, so changing them need not rerun a
# stage: package docstrings and lazy exports, error types, the params-validation machinery,
# output paths (dvc.yaml spells them itself), process and device settings, MLflow logging,
# argument parsing, the UI, the MLflow model wrapper (it serves a model file the stage has
# already written; a change to it cannot change models/<name>.pt or any metric).
PLUMBING = {
    "metalab",
    "metalab.algorithms",
    "metalab.data",
    "metalab.models",
    "metalab.rl",
    "metalab.errors",
    "metalab.schema",
    "metalab.layout",
    "metalab.runtime",
    "metalab.device",
    "metalab.tracking",
    "metalab.tracking_store",
    "metalab.cli",
    "metalab.ui",
    "metalab.mlflow_model",
}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_script(definition: dict) -> Path:
    command = (definition.get("do") or definition)["cmd"].split()
    assert command[0] == "python", command
    return ROOT / command[1]


def source_files_run_by(script: Path) -> set[str]:
    """Paths (relative to the project) of the src modules `script` can import, at any depth
    and inside functions too."""
    modules = closure(imported_modules(script), graph(), graph(module_level_only=True))
    return {
        str(MODULES[name].relative_to(ROOT))
        for name in modules
        if name in MODULES and name not in PLUMBING
    }


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_depends_on_every_source_file_it_runs(stage):
    definition = stages()[stage]
    body = definition.get("do") or definition
    deps = [str(dep) for dep in body.get("deps", [])]
    script = stage_script(definition)
    assert covered(str(script.relative_to(ROOT)), deps), f"{stage}: its script is no dep"
    missing = sorted(path for path in source_files_run_by(script) if not covered(path, deps))
    assert not missing, (
        f"dvc.yaml stage {stage} runs these files without depending on them: {missing}"
    )


def test_closure_follows_imports_inside_functions(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from metalab.training import Trainer\n")
    assert "src/metalab/evaluation.py" in source_files_run_by(script)


def test_only_experiments_that_start_from_the_pretrained_body_depend_on_it():
    from dvc.repo import Repo

    from metalab.layout import PRETRAIN_DIR
    from metalab.params import load_params

    experiments = load_params(ROOT / "params.yaml").experiments
    with Repo(str(ROOT)) as repo:
        deps = {
            stage.addressing: {Path(str(dep.def_path)) for dep in stage.deps}
            for stage in repo.index.stages
            if stage.addressing.startswith("train@")
        }
    pretrained = {name for name, e in experiments.items() if Path(e.body_init) == PRETRAIN_DIR}
    assert pretrained and pretrained != set(experiments)  # both kinds are configured
    for name in experiments:
        assert (PRETRAIN_DIR in deps[f"train@{name}"]) == (name in pretrained), name
