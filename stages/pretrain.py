"""Stage `pretrain`: supervised pretraining of a body on the meta-train classes only.

ANIL scenarios S3-S5 start from this body (`body_init: models/pretrain`), since
ImageNet weights cannot be downloaded here. The last `pretrain.validation_drawings`
drawings of every meta-train character are held out and measured
`pretrain.evaluations_per_epoch` times per epoch. Writes models/pretrain/body.pt, the
curve plots/pretrain.csv and metrics/pretrain.json (with its .info.json), each atomically:
a killed run leaves the previous outputs or none, and a rerun starts over.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import pandas as pd

from metalab.algorithms.pretrain import (
    CURVE_COLUMNS,
    PretrainParams,
    load_pretrain_params,
    pretrain_body,
    pretraining_sets,
)
from metalab.cli import run_stage, stage_parser
from metalab.data.prefetch import load_prefetched
from metalab.data.splits import make_split
from metalab.device import configure, device_record, resolve_device
from metalab.io import save_torch, write_text
from metalab.layout import (
    PREFETCHED_FILE,
    PRETRAIN_CURVE_FILE,
    PRETRAIN_METRICS_FILE,
    PRETRAINED_BODY_FILE,
)
from metalab.records import PretrainMetrics
from metalab.tracking import memory_figures, stage_run


def summary(
    config, curve: list[dict[str, float]], characters: int, images: int, held_out: int
) -> dict:
    """The curve's figures for `PretrainMetrics` (without cost and device)."""
    last = curve[-1]
    validated = [row for row in curve if "validation_accuracy" in row]
    best = max(validated, key=lambda row: row["validation_accuracy"], default=None)
    return {
        "model": config.model.name,
        "epochs": config.epochs,
        "steps": int(last["step"]),
        "characters": characters,
        "training_images": images,
        "validation_images": held_out,
        "final_loss": last["loss"],
        "final_accuracy": last["accuracy"],
        "final_validation_loss": last.get("validation_loss"),
        "final_validation_accuracy": last.get("validation_accuracy"),
        "best_validation_accuracy": None if best is None else best["validation_accuracy"],
        "best_validation_epoch": None if best is None else best["epoch"],
        "validation_accuracy_by_epoch": {
            str(int(row["epoch"])): row["validation_accuracy"]
            for row in validated
            if row["epoch"] == int(row["epoch"])
        },
        "channels_last": config.channels_last,
        "precision": config.precision,
    }


def main(args, params: PretrainParams) -> None:
    config = params.pretrain
    logged = {"pretrain": config.model_dump(), "data": {"split": params.data.split.model_dump()}}
    device = resolve_device()
    configure(device, config.threads)
    with stage_run("pretrain", logged, params.tracking, device=device) as run:
        arrays = load_prefetched(PREFETCHED_FILE)
        split = make_split(arrays.character_origin, params.data.split)
        sets = pretraining_sets(
            arrays, split, config.validation_drawings, config.drawings_per_class
        )
        curve: list[dict[str, float]] = []

        def log(row: dict[str, float], step: int) -> None:
            curve.append(row)
            run.log_metrics({k: v for k, v in row.items() if k != "step"}, step)

        started = time.perf_counter()
        state = pretrain_body(
            config.model,
            sets.images,
            sets.labels,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            progress=not args.no_progress,
            device=device,
            on_log=log,  # loss and accuracy curves, step = optimizer steps
            validation_images=sets.validation_images,
            validation_labels=sets.validation_labels,
            evaluations_per_epoch=config.evaluations_per_epoch,
            precision=config.precision,
            channels_last=config.channels_last,
        )
        seconds = time.perf_counter() - started
        trained = config.epochs * sets.labels.numel()
        run.meter.add_tasks(trained, seconds)  # 'tasks' here: training images
        characters = int(sets.labels.max()) + 1
        record = PretrainMetrics(
            **summary(
                config, curve, characters, sets.labels.numel(), sets.validation_labels.numel()
            ),
            training_seconds=seconds,
            images_per_s=trained / seconds,
            **asdict(device_record(device)),
            **memory_figures(device),
            mlflow_run_id=run.run_id,
        )
        save_torch(
            PRETRAINED_BODY_FILE,
            {"model": config.model.model_dump(), "image_size": arrays.image_size, "body": state},
        )
        columns = [c for c in CURVE_COLUMNS if any(c in row for row in curve)]
        write_text(PRETRAIN_CURVE_FILE, pd.DataFrame(curve, columns=columns).to_csv(index=False))
        record.write(PRETRAIN_METRICS_FILE)
    accuracy = record.final_validation_accuracy
    held_out = "" if accuracy is None else f", held-out accuracy {accuracy:.3f}"
    print(
        f"pretrained {config.model.name} body on {characters} meta-train characters on "
        f"{device}: {config.epochs} epochs in {seconds:.0f} s{held_out}"
    )


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__), load_pretrain_params)
