"""Stage `pretrain`: supervised pretraining of a body on the meta-train classes only.

ANIL scenarios S3-S5 start from this body (`body_init: models/pretrain`), since
ImageNet weights cannot be downloaded here. Writes models/pretrain/body.pt.
"""

from __future__ import annotations

from metalab.algorithms.pretrain import (
    PretrainParams,
    load_pretrain_params,
    meta_train_drawings,
    pretrain_body,
)
from metalab.cli import run_stage, stage_parser
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.device import configure, resolve_device
from metalab.io import save_torch
from metalab.layout import PREFETCHED_FILE, PRETRAINED_BODY_FILE
from metalab.tracking import stage_run


def main(args, params: PretrainParams) -> None:
    config = params.pretrain
    logged = {"pretrain": config.model_dump(), "data": {"split": params.data.split.model_dump()}}
    device = resolve_device()
    configure(device, config.threads)
    with stage_run("pretrain", logged, params.tracking, device=device) as run:
        arrays = load_prefetched(PREFETCHED_FILE)
        split = make_split(arrays.character_origin, params.data.split)
        images, labels = meta_train_drawings(arrays, split, config.drawings_per_class)
        state = pretrain_body(
            config.model,
            images,
            labels,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            progress=not args.no_progress,
            device=device,
            on_epoch=run.log_metrics,  # loss and accuracy curves, step = epoch
        )
        run.meter.add_tasks(config.epochs * labels.numel())  # 'tasks' here: training images
        save_torch(
            PRETRAINED_BODY_FILE,
            {"model": config.model.model_dump(), "image_size": arrays.image_size, "body": state},
        )
        characters = int(labels.max()) + 1
        print(
            f"pretrained {config.model.name} body on {characters} meta-train characters on {device}"
        )


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__), load_pretrain_params)
