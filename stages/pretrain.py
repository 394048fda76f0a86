"""Stage `pretrain`: supervised pretraining of a body on the meta-train classes only.

ANIL scenarios S3-S5 start from this body (`pretrained.source: background`), since
ImageNet weights cannot be downloaded here. Writes models/pretrain/body.pt.
"""

from __future__ import annotations

import torch

from metalab.algorithms.pretrain import pretrain_body
from metalab.cli import run_stage, stage_parser
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.io import save_torch
from metalab.layout import PREFETCHED_FILE, PRETRAINED_BODY_FILE
from metalab.params import Params
from metalab.tracking import stage_run


def main(args, params: Params) -> None:
    config = params.pretrain
    arrays = load_prefetched(PREFETCHED_FILE)
    split = make_split(arrays.character_origin, params.data.split)
    # Meta-train characters only: validation and meta-test classes stay unseen.
    characters = split.meta_train[:, 0].unique()
    drawings = arrays.drawings_per_character
    rows = (characters.view(-1, 1) * drawings + torch.arange(drawings)).flatten()
    labels = torch.arange(characters.numel()).repeat_interleave(drawings)
    with stage_run(
        "pretrain",
        {"pretrain": config.model_dump(), "data": {"split": params.data.split.model_dump()}},
        params.tracking.experiment_name,
        enabled=params.tracking.enabled,
    ) as run:
        state = pretrain_body(
            config.model,
            arrays.images[rows],
            labels,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            progress=not args.no_progress,
        )
        run.meter.add_tasks(config.epochs * rows.numel())  # 'tasks' here: training images
        save_torch(
            PRETRAINED_BODY_FILE,
            {"model": config.model.model_dump(), "image_size": arrays.image_size, "body": state},
        )
        print(f"pretrained {config.model.name} body on {characters.numel()} meta-train characters")


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
