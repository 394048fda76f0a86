"""Where each stage reads and writes, relative to the project root: the one place paths are
built (dvc.yaml's ``deps``/``outs`` spell the same paths; tests/test_layout.py checks it)."""

from __future__ import annotations

from pathlib import Path

RAW_DIR = Path("data/raw")
PREFETCHED_FILE = Path("data/prefetched/omniglot.npz")
EPISODES_DIR = Path("data/episodes")
PRETRAIN_DIR = Path("models/pretrain")
PRETRAINED_BODY_FILE = PRETRAIN_DIR / "body.pt"
# ``experiments.<name>.body_init`` for a random start: the starting weights are a function of
# the model code (and the seed), so that code is the train stage's dependency.
RANDOM_BODY_INIT = "src/metalab/models"
MODELS_DIR = Path("models")
CHECKPOINTS_DIR = Path("checkpoints")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")

DATA_METRICS_FILE = METRICS_DIR / "data.json"
PREFETCH_METRICS_FILE = METRICS_DIR / "prefetch.json"
EPISODES_METRICS_FILE = METRICS_DIR / "episodes.json"
PRETRAIN_METRICS_FILE = METRICS_DIR / "pretrain.json"
PRETRAIN_CURVE_FILE = PLOTS_DIR / "pretrain.csv"


def episode_set_file(setting: str, directory: Path = EPISODES_DIR) -> Path:
    """The stored meta-test tasks of ``setting`` (e.g. '5w1s')."""
    return Path(directory) / f"{setting}.npz"


# ------------------------------------------------------------- vision experiments
def model_file(experiment: str) -> Path:
    return MODELS_DIR / f"{experiment}.pt"


def checkpoint_file(experiment: str) -> Path:
    return CHECKPOINTS_DIR / f"{experiment}.pt"


def train_metrics_file(experiment: str) -> Path:
    return METRICS_DIR / "train" / f"{experiment}.json"


def train_curve_file(experiment: str) -> Path:
    return PLOTS_DIR / "train" / f"{experiment}.csv"


def eval_metrics_file(experiment: str) -> Path:
    return METRICS_DIR / "eval" / f"{experiment}.json"


def eval_episodes_file(experiment: str) -> Path:
    return METRICS_DIR / "eval" / f"{experiment}.episodes.csv"


# ------------------------------------------------------------------ RL experiments
def rl_model_file(experiment: str) -> Path:
    return MODELS_DIR / "rl" / f"{experiment}.pt"


def rl_checkpoint_file(experiment: str) -> Path:
    return CHECKPOINTS_DIR / "rl" / f"{experiment}.pt"


def rl_train_metrics_file(experiment: str) -> Path:
    return METRICS_DIR / "train_rl" / f"{experiment}.json"


def rl_train_curve_file(experiment: str) -> Path:
    return PLOTS_DIR / "train_rl" / f"{experiment}.csv"


def rl_eval_metrics_file(experiment: str) -> Path:
    return METRICS_DIR / "eval_rl" / f"{experiment}.json"
