"""The smoke profile: every experiment of params.yaml, at toy budgets, valid params."""

from __future__ import annotations

from pathlib import Path

from metalab.params import validate_params
from metalab.rl.config import RLExperimentConfig
from metalab.schema import read_params_file
from metalab.smoke import SMOKE_EPISODES_PER_SETTING, SMOKE_TRAIN, smoke_params

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_keeps_every_experiment_at_toy_budgets():
    raw = read_params_file(ROOT / "params.yaml")
    full = validate_params(raw)
    smoke = validate_params(smoke_params(raw, ROOT))
    assert list(smoke.experiments) == list(full.experiments)
    assert list(smoke.rl_experiments) == list(full.rl_experiments)
    for name in full.experiments:
        config = smoke.train_config(name)
        assert config.iterations == SMOKE_TRAIN["iterations"] < full.train_config(name).iterations
        # What makes the learner what it is stays: options, network, precision, body.
        assert smoke.experiment(name).options == full.experiment(name).options
        assert smoke.experiment(name).model == full.experiment(name).model
        assert smoke.experiment(name).body_init == full.experiment(name).body_init
        assert config.precision == full.train_config(name).precision
    for name, experiment in smoke.rl_experiments.items():
        assert isinstance(experiment, RLExperimentConfig)
        assert experiment.iterations < full.rl_experiments[name].iterations
    assert smoke.evaluate.max_episodes == SMOKE_EPISODES_PER_SETTING
    assert smoke.pretrain.epochs == 1 and smoke.pretrain.drawings_per_class == 2
    assert not smoke.tracking.enabled  # the project's MLflow store is left alone
    local = [s for s in smoke.data.sources if "://" not in s]
    assert local and all(Path(s).is_absolute() for s in local)
