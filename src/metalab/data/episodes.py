"""Few-shot episodes: the batched tensors every learner consumes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalab.data.config import EpisodesConfig, parse_setting
from metalab.data.splits import Split
from metalab.io import save_npz
from metalab.layout import episode_set_file


@dataclass
class Episodes:
    """A batch of N-way K-shot tasks with Q queries per class.

    Shapes (T tasks, N ways, K shots, Q queries, images H x W, ink = 1.0):
      support_x: float32 [T, N*K, 1, H, W]   support_y: int64 [T, N*K], labels 0..N-1
      query_x:   float32 [T, N*Q, 1, H, W]   query_y:   int64 [T, N*Q]
    Labels are ordered class-major: support_y[t] = [0]*K + [1]*K + ... .
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def n_way(self) -> int:
        return int(self.support_y.max().item()) + 1

    @property
    def k_shot(self) -> int:
        return self.support_x.shape[1] // self.n_way

    def task(self, index: int) -> Episodes:
        """The single task `index`, keeping a leading task dimension of 1."""
        return self[index : index + 1]

    def __getitem__(self, index: slice) -> Episodes:
        return Episodes(
            self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index]
        )

    def to(self, device: torch.device | str) -> Episodes:
        return Episodes(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.support_x, self.support_y, self.query_x, self.query_y)


@dataclass
class EpisodeIndex:
    """Which images make up a batch of tasks, without the pixels (cheap to store).

    image_index: int64 [T, N, K+Q], rows of the prefetched image array; per class the
                 first K are the support drawings, the remaining Q the queries.
    rotation:    int64 [T, N], quarter turns applied to all images of that class.
    character:   int64 [T, N], the global character index of each class.
    """

    image_index: torch.Tensor
    rotation: torch.Tensor
    character: torch.Tensor
    k_shot: int

    @property
    def num_tasks(self) -> int:
        return self.image_index.shape[0]

    @property
    def n_way(self) -> int:
        return self.image_index.shape[1]

    @property
    def query_per_class(self) -> int:
        return self.image_index.shape[2] - self.k_shot

    def __getitem__(self, index: slice) -> EpisodeIndex:
        return EpisodeIndex(
            self.image_index[index], self.rotation[index], self.character[index], self.k_shot
        )


def sample_episode_index(
    classes: torch.Tensor,
    drawings_per_character: int,
    n_way: int,
    k_shot: int,
    query_per_class: int,
    num_tasks: int,
    generator: torch.Generator,
) -> EpisodeIndex:
    """Draw `num_tasks` N-way tasks from `classes` (int64 [C, 2]: character, rotation).

    Each task takes N distinct classes and, per class, K+Q distinct drawings. Vectorised:
    one `argsort` of random keys picks the classes of all tasks, one more the drawings.
    """
    num_classes = classes.shape[0]
    per_class = k_shot + query_per_class
    if n_way > num_classes:
        raise ValueError(f"{n_way}-way tasks need {n_way} classes; this split has {num_classes}")
    if per_class > drawings_per_character:
        raise ValueError(
            f"{k_shot} shots + {query_per_class} queries need {per_class} drawings per class; "
            f"each character has {drawings_per_character}"
        )
    chosen = torch.rand(num_tasks, num_classes, generator=generator).argsort(dim=1)[:, :n_way]
    task_classes = classes[chosen]  # [T, N, 2]
    drawings = torch.rand(num_tasks, n_way, drawings_per_character, generator=generator)
    drawings = drawings.argsort(dim=2)[:, :, :per_class]
    character = task_classes[..., 0]
    image_index = character.unsqueeze(-1) * drawings_per_character + drawings
    return EpisodeIndex(image_index, task_classes[..., 1].clone(), character.clone(), k_shot)


def materialize(images: torch.Tensor, index: EpisodeIndex) -> Episodes:
    """Gather the pixels of `index` from `images` (uint8 [N_images, S, S], ink = 255).

    Returns float32 episodes with ink = 1.0 (see `Episodes` for shapes).
    """
    num_tasks, n_way, per_class = index.image_index.shape
    size = images.shape[-1]
    pixels = images[index.image_index].to(torch.float32).div_(255.0)  # [T, N, K+Q, S, S]
    for turns in (1, 2, 3):
        mask = index.rotation == turns
        if mask.any():
            pixels[mask] = torch.rot90(pixels[mask], turns, dims=(-2, -1))
    labels = torch.arange(n_way).view(1, n_way, 1)
    k_shot = index.k_shot
    query = per_class - k_shot

    def flatten(x: torch.Tensor, count: int) -> torch.Tensor:
        return x.reshape(num_tasks, n_way * count, 1, size, size)

    return Episodes(
        support_x=flatten(pixels[:, :, :k_shot], k_shot),
        support_y=labels.expand(num_tasks, n_way, k_shot).reshape(num_tasks, -1).clone(),
        query_x=flatten(pixels[:, :, k_shot:], query),
        query_y=labels.expand(num_tasks, n_way, query).reshape(num_tasks, -1).clone(),
    )


def sample_episodes(
    images: torch.Tensor,
    classes: torch.Tensor,
    drawings_per_character: int,
    n_way: int,
    k_shot: int,
    query_per_class: int,
    num_tasks: int,
    generator: torch.Generator,
) -> Episodes:
    """Sample `num_tasks` N-way K-shot tasks with Q queries per class.

    images: uint8 [N_images, S, S] prefetched Omniglot (rows c*D .. c*D+D-1 are character
    c's D drawings); classes: int64 [C, 2] (character, rotation) of one split part.
    Returns `Episodes`: support_x float32 [T, N*K, 1, S, S], support_y int64 [T, N*K],
    query_x [T, N*Q, 1, S, S], query_y [T, N*Q]. Deterministic for the generator's state.
    """
    index = sample_episode_index(
        classes, drawings_per_character, n_way, k_shot, query_per_class, num_tasks, generator
    )
    return materialize(images, index)


def save_episode_set(path: str | Path, index: EpisodeIndex, **metadata: str | int) -> None:
    """Store a fixed episode set (indices only) as .npz, atomically."""
    save_npz(
        path,
        image_index=index.image_index.numpy(),
        rotation=index.rotation.numpy(),
        character=index.character.numpy(),
        k_shot=np.array(index.k_shot),
        **{f"meta_{key}": np.array(value) for key, value in metadata.items()},
    )


def load_episode_set(path: str | Path) -> tuple[EpisodeIndex, dict[str, str | int]]:
    """Read an episode set written by `save_episode_set`: (index, metadata)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no episode set here; run `dvc repro episodes` first")
    with np.load(path, allow_pickle=False) as stored:
        missing = {"image_index", "rotation", "character", "k_shot"} - set(stored.files)
        if missing:
            raise ValueError(f"{path}: not an episode set (missing {', '.join(sorted(missing))})")
        index = EpisodeIndex(
            torch.from_numpy(stored["image_index"]).long(),
            torch.from_numpy(stored["rotation"]).long(),
            torch.from_numpy(stored["character"]).long(),
            int(stored["k_shot"]),
        )
        metadata = {
            key.removeprefix("meta_"): stored[key].item()
            for key in stored.files
            if key.startswith("meta_")
        }
    return index, metadata


def setting_seed(seed: int, setting: str) -> int:
    """A per-setting seed that does not depend on which other settings are configured."""
    return seed * 1_000_003 + zlib.crc32(setting.encode())


def write_evaluation_episodes(
    directory: Path, split: Split, drawings_per_character: int, config: EpisodesConfig
) -> dict[str, str]:
    """Sample and store one fixed meta-test episode set per configured setting.

    Returns {setting: path}. Sets are drawn from ``split.meta_test`` only.
    """
    written: dict[str, str] = {}
    for setting in config.settings:
        n_way, k_shot = parse_setting(setting)
        generator = torch.Generator().manual_seed(setting_seed(config.seed, setting))
        index = sample_episode_index(
            split.meta_test,
            drawings_per_character,
            n_way,
            k_shot,
            config.query_per_class,
            config.num_episodes,
            generator,
        )
        path = episode_set_file(setting, directory)
        save_episode_set(path, index, setting=setting, protocol=split.protocol, part="meta_test")
        written[setting] = str(path)
    return written
