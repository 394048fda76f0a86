"""Where each stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from pathlib import Path

RAW_DIR = Path("data/raw")
PREFETCHED_FILE = Path("data/prefetched/omniglot.npz")
EPISODES_DIR = Path("data/episodes")
PRETRAINED_BODY_FILE = Path("models/pretrain/body.pt")
MODELS_DIR = Path("models")
CHECKPOINTS_DIR = Path("checkpoints")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")


def episode_set_file(setting: str) -> Path:
    return EPISODES_DIR / f"{setting}.npz"
