"""dvc.yaml declares every params.yaml key a stage reads: the keys are read from the code
(``params.<section>.<key>`` chains and the `Params` accessors) of each stage script and of
the library code that receives its params object, so an undeclared read fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Library code a stage hands its whole params object to (``Trainer(name, params, ...)``).
TRAINING = ROOT / "src" / "metalab" / "training.py"
RECEIVERS = {"train": [TRAINING], "train_seed": [TRAINING]}
# Keys of a `Params` accessor, in dvc.yaml's spelling (``${key}``: the foreach item; a stage
# whose command names ``${item.experiment}`` spells it so, see `experiment_spelling`).
ACCESSORS = {
    "experiment": ["experiments.${key}"],
    "train_config": ["train", "experiments.${key}"],
    "seeded": ["train.seed", "experiments.${key}"],
    "evaluation_settings": ["evaluate.settings", "episodes.settings"],
    "rl_experiment": ["rl_experiments.${key}"],
}
# Keys that change no result: where MLflow records runs, and how many processes decode
# the archives (the prefetched file is byte-identical for any count: tests/test_prefetch.py).
UNDECLARED_BY_DESIGN = {"tracking", "data.prefetch_workers"}


def _chain(node: ast.AST) -> tuple[str | None, list[str]]:
    """(base name, attribute names) of ``base.a.b`` or ``base.a(...).b``; calls are kept as
    ``name()`` entries."""
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Attribute):
                return None, []
            parts.append(node.func.attr + "()")
            node = node.func.value
        else:
            break
    return (node.id if isinstance(node, ast.Name) else None), parts[::-1]


def _keys(parts: list[str]) -> list[str]:
    """The params keys one chain below ``params`` reads."""
    first = parts[0].removesuffix("()")
    if first in ACCESSORS:
        keys = list(ACCESSORS[first])
        rest = [p for p in parts[1:] if not p.endswith("()")]
        if first == "train_config" and rest:  # params.train_config(name).threads
            keys = [f"train.{rest[0]}", "experiments.${key}"]
        return keys
    fields = []
    for part in parts:
        if part.endswith("()"):  # a method (model_dump(), items()): the whole value is read
            break
        fields.append(part)
    return [".".join(fields)] if fields else []


def keys_read(path: Path) -> set[str]:
    """Dotted params keys read in `path` through a name ``params`` or an alias of a part of
    it (``data = params.data`` then ``data.sources``)."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, list[str]] = {}
    alias_values: set[int] = set()  # ``params.data`` in ``data = params.data`` reads nothing
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            base, parts = _chain(node.value)
            if isinstance(target, ast.Name) and base == "params" and parts:
                if not any(p.endswith("()") for p in parts):
                    aliases[target.id] = parts
                    alias_values.add(id(node.value))
    # Only whole chains: skip the parts of a longer one (``params.data`` in ``params.data.x``).
    inner = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    inner |= {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    inner |= alias_values
    keys: set[str] = set()
    used_aliases: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute | ast.Call) or id(node) in inner:
            continue
        base, parts = _chain(node)
        if base in aliases:
            used_aliases.add(base)
            base, parts = "params", aliases[base] + parts
        if base == "params" and parts:
            keys.update(_keys(parts))
    # an alias never read further (``seed = params.train.seed``) reads its own value
    for name, parts in aliases.items():
        if name not in used_aliases:
            keys.update(_keys(parts))
    return keys


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def experiment_spelling(key: str, command: str) -> str:
    """`key` as the stage spells its experiment: stages over seed runs (a foreach over
    ``seed_runs`` or a matrix) name it ``${item.experiment}``, the others ``${key}``."""
    if "${item.experiment}" in command:
        return key.replace("${key}", "${item.experiment}")
    return key


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_declares_every_param_key_it_reads(stage):
    body = stages()[stage].get("do") or stages()[stage]
    script = ROOT / body["cmd"].split()[1]
    declared = [str(entry) for entry in body.get("params", [])]
    read = keys_read(script)
    for receiver in RECEIVERS.get(stage, []):
        read |= keys_read(receiver)
    read = {experiment_spelling(key, body["cmd"]) for key in read}
    missing = sorted(
        key
        for key in read
        if not covered(key, sorted(UNDECLARED_BY_DESIGN)) and not covered(key, declared)
    )
    assert not missing, f"dvc.yaml stage {stage} reads params it does not declare: {missing}"


def test_key_reader_sees_chains_and_accessors(tmp_path):
    code = tmp_path / "stage.py"
    code.write_text(
        "def main(args, params):\n"
        "    a = params.data.split.model_dump()\n"
        "    b = params.train_config(args.name).seed\n"
        "    c = params.tracking.enabled\n"
    )
    assert keys_read(code) == {"data.split", "train.seed", "experiments.${key}", "tracking.enabled"}
