"""The meta-RL part of the report, from hand-written metric files (numbers) and the info
files beside them (text): seeds aggregated with their spread, references as rows of
their own (repeated ones once), the headline gain at a learner's trained step count."""

import json

import pytest

from metalab.report.rl import plot_rl_adaptation, rl_markdown, rl_results


def write(path, numbers, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(numbers))
    path.with_name(path.stem + ".info.json").write_text(json.dumps(text))


def returns(before, after, ci=(4.0, 1.8, 2.0)):
    return {
        "before_adaptation": {"mean_return": before, "ci95": ci[0], "std": 12.9},
        "after_1_steps": {"mean_return": after, "ci95": ci[1], "std": 5.8},
        "after_3_steps": {"mean_return": after + 1, "ci95": ci[2], "std": 6.6},
    }


def evaluation(directory, run, experiment, algorithm, numbers, seed=None, **extra):
    if seed is not None:
        numbers = {**numbers, "seed": seed}
    write(
        directory / "eval_rl" / f"{run}.json",
        {"num_tasks": 40, **numbers, **extra},
        {"experiment": experiment, "algorithm": algorithm, "env": "navigation_2d"},
    )


def training(directory, run, experiment, seconds, seed=None):
    numbers = {
        "iterations": 200,
        "training_seconds": seconds,
        "tasks_per_s": 24.0,
        "final_pre_adaptation_return": -40.0,
        "final_post_adaptation_return": -14.0,
        "peak_memory_mb": 1197.0,
    }
    if seed is not None:
        numbers["seed"] = seed
    write(
        directory / "train_rl" / f"{run}.json",
        numbers,
        {
            "experiment": experiment,
            "algorithm": "maml_rl",
            "env": "navigation_2d",
            "mlflow_run_id": None,
        },
    )


@pytest.fixture
def metrics(tmp_path):
    """One seed each, files without a `seed` (as written before seeds were stages)."""
    evaluation(tmp_path, "maml_rl", "maml_rl", "maml_rl", returns(-40.0, -14.0))
    evaluation(tmp_path, "anil_rl", "anil_rl", "anil_rl", returns(-48.0, -18.0))
    training(tmp_path, "maml_rl", "maml_rl", 250.0)
    return tmp_path


def test_results_table_rows_and_gain(metrics):
    results = rl_results(metrics)
    assert len(results) == 6 and set(results["seeds"]) == {1}
    maml = results[results["experiment"] == "maml_rl"].set_index("steps")
    assert maml.loc[0, "mean_return"] == -40.0 and maml.loc[3, "mean_return"] == -13.0
    assert maml["seed_std"].isna().all()  # no spread from one seed
    text = rl_markdown(results)
    assert (
        "| maml_rl | navigation_2d | 1 | -40.00 ± 4.00 | -14.00 ± 1.80 | -13.00 ± 2.00 "
        "| +26.00 (1) | 4.2 min | 24.0 | 1197 |" in text
    )
    assert (
        "| anil_rl | navigation_2d | 1 | -48.00 ± 4.00 | -18.00 ± 1.80 | -17.00 ± 2.00 "
        "| +30.00 (1) | - | - | - |" in text
    )


def test_seeds_are_aggregated_with_their_spread(tmp_path):
    for seed, (before, after, seconds) in enumerate(
        [(-40, -14, 200), (-44, -10, 260), (-42, -18, 230)]
    ):
        run = f"maml_rl-s{seed}"
        evaluation(tmp_path, run, "maml_rl", "maml_rl", returns(before, after, (3, 1, 2)), seed)
        training(tmp_path, run, "maml_rl", float(seconds), seed)
    results = rl_results(tmp_path)
    assert len(results) == 3  # one row per step count, not per seed
    after = results.set_index("steps").loc[1]
    assert after["seeds"] == 3 and after["mean_return"] == pytest.approx(-14.0)
    assert after["seed_std"] == pytest.approx(4.0)  # sample std of -14, -10, -18
    assert (after["seed_min"], after["seed_max"]) == (-18.0, -10.0)
    assert after["ci95"] == pytest.approx(1.0)
    assert after["training_seconds"] == pytest.approx(230.0)
    text = rl_markdown(results)
    assert (
        "| maml_rl | navigation_2d | 3 | -42.00 ± 3.00 [-44.00, -40.00] "
        "| -14.00 ± 1.00 [-18.00, -10.00] | -13.00 ± 2.00 [-17.00, -9.00] | +28.00 (1) "
        "| 3.8 min |" in text
    )
    assert "[min, max] between seeds" in text
    assert plot_rl_adaptation(results, tmp_path / "rl.png").stat().st_size > 10_000


def test_plot_is_written_and_empty_results_are_handled(metrics, tmp_path):
    path = plot_rl_adaptation(rl_results(metrics), tmp_path / "rl.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    empty = rl_results(tmp_path / "nothing")
    assert empty.empty
    assert "No RL evaluations" in rl_markdown(empty)
    assert plot_rl_adaptation(empty, tmp_path / "none.png").stat().st_size > 1000


def test_references_are_rows_of_their_own_and_steps_beyond_training_are_marked(metrics):
    oracle = returns(-5.0, -5.0, (0.1, 0.1, 0.1))
    oracle["after_1_steps"]["mean_return"] = oracle["after_3_steps"]["mean_return"] = -5.0
    random_init = {key: {**value, "mean_return": -60.0} for key, value in oracle.items()}
    for name in ("maml_rl", "anil_rl"):  # the same oracle twice: one row
        path = metrics / "eval_rl" / f"{name}.json"
        numbers = json.loads(path.read_text())
        numbers.update(trained_steps=1, reference_oracle=oracle)
        if name == "maml_rl":
            numbers["reference_random_init"] = random_init
        path.write_text(json.dumps(numbers))

    results = rl_results(metrics)
    assert sorted(results["policy"].unique()) == ["meta_learned", "oracle", "random_init"]
    assert len(results[results["policy"] == "oracle"]) == 3
    # Learners first, references after; the reference rows carry no training cost.
    assert list(results["policy"])[:6] == ["meta_learned"] * 6
    assert results[results["policy"] != "meta_learned"]["training_seconds"].isna().all()
    maml = results[(results["experiment"] == "maml_rl") & (results["policy"] == "meta_learned")]
    assert list(maml["beyond_training"]) == [False, False, True]
    assert not results[results["policy"] == "random_init"]["beyond_training"].any()

    text = rl_markdown(results)
    assert (
        "| maml_rl | navigation_2d | 1 | -40.00 ± 4.00 | -14.00 ± 1.80 | -13.00 ± 2.00* |" in text
    )
    assert "| reference: oracle | navigation_2d | 1 | -5.00 ± 0.10 |" in text
    assert "| reference: random init (maml_rl) | navigation_2d | 1 | -60.00 ± 0.10 |" in text
    assert "* more adaptation steps than" in text
    assert plot_rl_adaptation(results, metrics / "rl.png").stat().st_size > 10_000


def test_a_reference_repeated_at_every_seed_is_one_row_and_a_different_one_stays(tmp_path):
    for seed in (0, 1):
        init = {k: {**v, "mean_return": -60.0 - seed} for k, v in returns(0, 0).items()}
        for name in ("maml_rl", "reptile_rl"):
            evaluation(
                tmp_path,
                f"{name}-s{seed}",
                name,
                name,
                returns(-40.0, -14.0),
                seed,
                trained_steps=1,
                reference_random_init=init,
            )
    results = rl_results(tmp_path)
    init = results[results["policy"] == "random_init"]
    assert set(init["experiment"]) == {"maml_rl"} and set(init["seeds"]) == {2}
    assert init.set_index("steps").loc[0, "mean_return"] == pytest.approx(-60.5)
    # reptile's random init differs at one seed: it is a row of its own then.
    path = tmp_path / "eval_rl" / "reptile_rl-s1.json"
    numbers = json.loads(path.read_text())
    numbers["reference_random_init"]["before_adaptation"]["mean_return"] = -70.0
    path.write_text(json.dumps(numbers))
    init = rl_results(tmp_path).query("policy == 'random_init'")
    assert set(init["experiment"]) == {"maml_rl", "reptile_rl"}


def test_pretrained_is_a_reference_and_a_learner_is_headlined_at_its_trained_steps(tmp_path):
    evaluation(
        tmp_path, "reptile_rl", "reptile_rl", "reptile_rl", returns(-40, -20), trained_steps=3
    )
    evaluation(
        tmp_path, "pretrained_rl", "pretrained_rl", "joint_pg", returns(-38, -30), trained_steps=0
    )
    results = rl_results(tmp_path)
    pretrained = results[results["experiment"] == "pretrained_rl"]
    assert set(pretrained["policy"]) == {"pretrained"}
    assert not pretrained["beyond_training"].any()
    assert list(results["policy"]) == ["meta_learned"] * 3 + ["pretrained"] * 3
    text = rl_markdown(results)
    # Reptile trained with 3 inner steps: its gain is quoted after 3; the reference's after 1.
    assert (
        "| reptile_rl | navigation_2d | 1 | -40.00 ± 4.00 | -20.00 ± 1.80 | -19.00 ± 2.00 "
        "| +21.00 (3) |" in text
    )
    assert (
        "| reference: pretrained, joint policy gradient (pretrained_rl) | navigation_2d | 1 "
        "| -38.00 ± 4.00 | -30.00 ± 1.80 | -29.00 ± 2.00 | +8.00 (1) |" in text
    )
