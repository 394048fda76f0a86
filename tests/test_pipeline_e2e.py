"""End to end: `dvc repro` of download -> prefetch -> episodes in a throwaway git repo on
tiny generated Omniglot archives; a param change reruns only the stages it affects."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from omniglot_fixture import expected_counts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_params(archive_dir: Path) -> dict:
    counts = expected_counts(background=(4, 5), evaluation=(3, 4), drawings=20)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(
        sources=[str(archive_dir / "no-such-mirror"), str(archive_dir)],
        expected={name: vars(count) for name, count in counts.items()},
        prefetch_workers=1,
    )
    params["data"]["split"].update(validation_characters=5)
    params["episodes"].update(settings=["5w1s", "3w2s"], num_episodes=12, query_per_class=3)
    params["pretrain"].update(model={"name": "conv4", "hidden": 8}, epochs=1, batch_size=64)
    params["train"].update(
        n_way=3,
        query_per_class=2,
        meta_batch_size=2,
        iterations=4,
        validate_every=2,
        validation_episodes=3,
        checkpoint_every=2,
        threads=1,
        precision="fp32",
    )
    params["experiments"] = {"tiny": {"algorithm": "protonets", "model": {"hidden": 8}}}
    return params


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["dvc", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=os.environ | {"DVC_NO_ANALYTICS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture
def repo(tmp_path, tiny_omniglot_dir, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "stages", "src"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, repo / item)
    (repo / "params.yaml").write_text(
        yaml.safe_dump(tiny_params(Path(tiny_omniglot_dir)), sort_keys=False)
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    return repo


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> set[str]:
    return {
        stage
        for stage in ("download", "prefetch", "episodes")
        if f"Running stage '{stage}'" in output
    }


def test_repro_builds_data_and_reruns_only_affected_stages(repo):
    first = dvc(repo, "repro", "episodes")
    assert ran(first) == {"download", "prefetch", "episodes"}

    data = json.loads((repo / "metrics" / "data.json").read_text())
    assert data["images_background"]["drawings"] == 400
    assert data["images_evaluation"]["characters"] == 12
    assert len(data["images_background"]["sha256"]) == 64
    with np.load(repo / "data" / "prefetched" / "omniglot.npz") as prefetched:
        assert prefetched["images"].shape == (640, 28, 28)
    with np.load(repo / "data" / "episodes" / "3w2s.npz") as episodes:
        assert episodes["image_index"].shape == (12, 3, 5)

    assert ran(dvc(repo, "repro", "episodes")) == set()  # nothing changed, nothing runs

    set_param(repo, "episodes", "num_episodes", 7)
    assert ran(dvc(repo, "repro", "episodes")) == {"episodes"}

    set_param(repo, "data", "image_size", 105)
    assert ran(dvc(repo, "repro", "episodes")) == {"prefetch", "episodes"}
    with np.load(repo / "data" / "prefetched" / "omniglot.npz") as prefetched:
        assert prefetched["images"].shape == (640, 105, 105)
