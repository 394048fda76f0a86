"""Pretraining speed: memory format and precision of the pretrain stage's training step.

    python benchmarks/pretrain.py [--data data/prefetched/omniglot.npz] [--rounds 6]
        [--batches 8] [--threads 2] [--profile]

Times `metalab.algorithms.pretrain.train_step`, what the stage runs, on real batches of the
meta-train drawings (params.yaml's ``data.split`` and ``pretrain`` section: ResNet18,
batch size, lr) in four variants: NCHW or channels-last, fp32 or bf16 autocast. One
process holds all four (each with its own model and Adam state, built from the same seed)
and times `--batches` steps of each in turn per round, the order rotating from round to
round, so that the machine's slow spells hit all alike; the table shows median images/s
of each variant and the median (quartiles) of its per-round ratio to NCHW fp32. Also timed:
one pass over the held-out drawings (`measure`, what each curve row costs).

Emulated bf16 (no AMX/AVX512-BF16) is so slow that ``--bf16-batches`` and
``--bf16-rounds`` (default: as the fp32 variants) can cut its share: a bf16 variant then
times that many steps in the first rounds only, without a warm-up, and its ratio is taken
over those rounds (per image). ``--variants`` picks a subset.

``--profile`` first times the phases of the fp32 NCHW step (forward, backward, optimizer
step) and lists the operators that take the most time (torch.profiler). The machine's load
average is recorded before and after. Writes benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metalab.algorithms.precision import cpu_has_native_bf16  # noqa: E402
from metalab.algorithms.pretrain import (  # noqa: E402
    batch_input,
    build_pretrain_model,
    load_pretrain_params,
    measure,
    pretraining_sets,
    train_step,
)
from metalab.data.prefetch import load_prefetched  # noqa: E402
from metalab.data.splits import make_split  # noqa: E402
from metalab.io import write_json  # noqa: E402
from metalab.runtime import cpu_model, keep_freed_memory  # noqa: E402

VARIANTS = {  # name: (channels_last, precision)
    "NCHW fp32": (False, "fp32"),
    "channels-last fp32": (True, "fp32"),
    "NCHW bf16": (False, "bf16"),
    "channels-last bf16": (True, "bf16"),
}
BASELINE = "NCHW fp32"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


def profile_step(model, optimizer, batches, channels_last: bool) -> dict:
    """Seconds per step in forward, backward and optimizer step (median over `batches`),
    and the top operators of those steps by self CPU time."""
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for x, y in batches:
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        done = time.perf_counter()
        phases["forward"].append(forward - start)
        phases["backward"].append(backward - forward)
        phases["optimizer"].append(done - backward)
    medians = {phase: statistics.median(times) for phase, times in phases.items()}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for x, y in batches:
            train_step(model, optimizer, x, y)
    events = sorted(
        profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True
    )
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    top = [
        {
            "op": event.key,
            "self_share": event.self_cpu_time_total / total,
            "calls_per_step": event.count / len(batches),
        }
        for event in events[:12]
    ]
    return {"channels_last": channels_last, "seconds_per_step": medians, "top_ops": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data/prefetched/omniglot.npz")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=8, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16-batches", type=int, default=None)
    parser.add_argument("--bf16-rounds", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/pretrain.json")
    args = parser.parse_args()
    keep_freed_memory()  # as every stage process
    torch.set_num_threads(args.threads)
    params = load_pretrain_params(args.params)
    config = params.pretrain
    arrays = load_prefetched(args.data)
    split = make_split(arrays.character_origin, params.data.split)
    sets = pretraining_sets(arrays, split, max(config.validation_drawings, 1))
    classes = int(sets.labels.max()) + 1
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(sets.labels.numel(), generator=generator)
    picks = [
        order[i * config.batch_size : (i + 1) * config.batch_size] for i in range(args.batches)
    ]
    load_before = os.getloadavg()

    def make(channels_last: bool):
        model = build_pretrain_model(
            config.model, classes, arrays.image_size, config.seed, channels_last
        )
        batches = [
            (batch_input(sets.images[pick], "cpu", channels_last), sets.labels[pick])
            for pick in picks
        ]
        return model, torch.optim.Adam(model.parameters(), lr=config.lr), batches

    report: dict = {}
    if args.profile:
        report["profile"] = [profile_step(*make(cl), channels_last=cl) for cl in (False, True)]
        for entry in report["profile"]:
            layout = "channels-last" if entry["channels_last"] else "NCHW"
            seconds = entry["seconds_per_step"].items()
            phases = ", ".join(f"{phase} {value * 1000:.0f} ms" for phase, value in seconds)
            print(f"{layout} fp32 step ({config.batch_size} images): {phases}")
            for op in entry["top_ops"]:
                print(
                    f"  {op['op']:<40} {op['self_share']:6.1%} self time, "
                    f"{op['calls_per_step']:.0f} calls/step"
                )

    names = [name.strip() for name in args.variants.split(",")]
    if BASELINE not in names or not set(names) <= set(VARIANTS):
        raise SystemExit(f"--variants: {BASELINE!r} and any of {', '.join(VARIANTS)}")
    contenders = {name: make(VARIANTS[name][0]) for name in names}
    steps = {
        name: args.bf16_batches or args.batches if VARIANTS[name][1] == "bf16" else args.batches
        for name in names
    }
    rounds_of = {
        name: args.bf16_rounds or args.rounds if VARIANTS[name][1] == "bf16" else args.rounds
        for name in names
    }

    def run(name: str) -> float:
        model, optimizer, batches = contenders[name]
        precision = VARIANTS[name][1]
        start = time.perf_counter()
        for x, y in batches[: steps[name]]:
            train_step(model, optimizer, x, y, precision)
        return time.perf_counter() - start

    for name in names:  # warm-up (oneDNN primitives, allocator), but not emulated bf16
        if steps[name] == args.batches and rounds_of[name] == args.rounds:
            run(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(args.rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            if round_number < rounds_of[name]:
                times[name].append(run(name))
                print(f"round {round_number}: {name} {times[name][-1]:.1f} s", flush=True)
    rows = []
    for name in names:
        per_image = [t / (steps[name] * config.batch_size) for t in times[name]]
        base = [t / (args.batches * config.batch_size) for t in times[BASELINE]]
        ratios = [b / own for b, own in zip(base, per_image, strict=False)]
        low, median, high = quartiles(ratios)
        rows.append(
            {
                "variant": name,
                "images_per_s": 1 / statistics.median(per_image),
                "ratio_median": median,
                "ratio_quartiles": [low, high],
                "steps_per_round": steps[name],
                "seconds": times[name],
            }
        )
    model, _, _ = contenders[BASELINE]
    validation_seconds = []
    for _ in range(3):
        start = time.perf_counter()
        measure(model, sets.validation_images, sets.validation_labels)
        validation_seconds.append(time.perf_counter() - start)
    load_after = os.getloadavg()
    epoch_images = sets.labels.numel()
    print(
        f"\n{config.model.name}, batch {config.batch_size}, {args.threads} threads, "
        f"{args.rounds} paired rounds of {args.batches} steps (bf16: "
        f"{args.bf16_rounds or args.rounds} of {args.bf16_batches or args.batches}); "
        f"{cpu_model()}, native bf16: "
        f"{cpu_has_native_bf16()}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}\n"
    )
    print("| variant | images/s | s per epoch | x NCHW fp32 (median) | quartiles |")
    print("| :--- | ---: | ---: | ---: | ---: |")
    for row in rows:
        low, high = row["ratio_quartiles"]
        print(
            f"| {row['variant']} | {row['images_per_s']:.0f} | "
            f"{epoch_images / row['images_per_s']:.0f} | {row['ratio_median']:.2f} | "
            f"{low:.2f}-{high:.2f} |"
        )
    held_out = sets.validation_labels.numel()
    print(
        f"\none pass over the {held_out} held-out drawings (fp32 NCHW, evaluation mode): "
        f"{statistics.median(validation_seconds):.1f} s"
    )
    report.update(
        {
            "date": datetime.date.today().isoformat(),
            "cpu": cpu_model(),
            "native_bf16": cpu_has_native_bf16(),
            "threads": args.threads,
            "model": config.model.name,
            "batch_size": config.batch_size,
            "image_size": arrays.image_size,
            "rounds": args.rounds,
            "steps_per_round": args.batches,
            "bf16_rounds": args.bf16_rounds or args.rounds,
            "bf16_steps_per_round": args.bf16_batches or args.batches,
            "training_images_per_epoch": epoch_images,
            "load_average_before": load_before[0],
            "load_average_after": load_after[0],
            "rows": rows,
            "validation_images": held_out,
            "validation_pass_seconds": validation_seconds,
        }
    )
    write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
