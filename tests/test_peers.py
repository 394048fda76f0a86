"""benchmarks/peers.py: its torch.func peers compute metalab's meta-gradients (so the
comparison is between correct MAML / ANIL / ProtoNets implementations), and a missing
learn2learn is skipped with its reason. Tiny Conv4s in float64; no learn2learn needed."""

from __future__ import annotations

import copy
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return load_script()


def tiny(peers: ModuleType, **changes: object) -> object:
    """A 3-way 1-shot config with 2 queries per class, 2 tasks, 2 inner steps, 4 channels."""
    config = peers.Config(
        name="tiny",
        description="test",
        algorithm="maml",
        downsample="stride",
        n_way=3,
        k_shot=1,
        queries=2,
        tasks=2,
        inner_steps=2,
        inner_lr=0.4,
        hidden=4,
    )
    return replace(config, **changes)


def float64_gradients(peers: ModuleType, config: object, build) -> dict[str, torch.Tensor]:
    """The meta-gradient of ``build(config, model)`` on seeded float64 weights and tasks."""
    model = peers.make_model(config).double()
    episodes = peers.random_episodes(config, seed=1, dtype=torch.float64)
    return peers.meta_gradient(build(config, copy.deepcopy(model)), episodes)


def metalab_loop(peers: ModuleType):
    return lambda config, model: peers.MetalabMAML(config, model, False, "fp32")


@pytest.mark.parametrize(
    "changes",
    [
        {},  # MAML, second order
        {"first_order": True},
        {"downsample": "maxpool", "head_only": True},  # ANIL, second order
        {"downsample": "maxpool", "head_only": True, "first_order": True},
    ],
    ids=["maml", "fomaml", "anil", "anil-first-order"],
)
def test_torch_func_peer_is_metalabs_maml(peers, changes):
    config = tiny(peers, **changes)
    reference = float64_gradients(peers, config, metalab_loop(peers))
    peer = float64_gradients(peers, config, peers.TorchFuncMAML)
    assert peers.max_relative_error(peer, reference) < peers.GRADIENT_TOLERANCE


@pytest.mark.parametrize("head_only", [False, True], ids=["maml", "anil"])
def test_the_order_matters_here(peers, head_only):
    # So the equality above pins the order: a peer that dropped (or kept) the second-order
    # terms would be far off on these tasks.
    config = tiny(peers, head_only=head_only)
    second = float64_gradients(peers, config, metalab_loop(peers))
    first = float64_gradients(peers, replace(config, first_order=True), metalab_loop(peers))
    assert peers.max_relative_error(first, second) > 1e-3


def test_protonets_peers_are_metalabs(peers):
    config = tiny(peers, algorithm="protonets", downsample="maxpool", inner_steps=0)
    reference = float64_gradients(peers, config, lambda c, m: peers.MetalabProtoNets(c, m, "fp32"))
    for peer in (peers.TorchFuncProtoNets, peers.PlainProtoNets):
        gradient = float64_gradients(peers, config, peer)
        assert peers.max_relative_error(gradient, reference) < peers.GRADIENT_TOLERANCE


def test_relative_error_ignores_rounding_noise_of_zero_gradients(peers):
    # A conv bias before BatchNorm has true gradient 0: noise / noise must not count.
    reference = {"weight": torch.ones(4), "bias": torch.full((2,), 1e-17)}
    gradient = {"weight": torch.ones(4), "bias": torch.full((2,), -1e-17)}
    assert peers.max_relative_error(gradient, reference) < 1e-12
    gradient["weight"] = torch.tensor([1.0, 1.0, 1.0, 1.1])
    assert peers.max_relative_error(gradient, reference) == pytest.approx(0.05)


def test_missing_learn2learn_is_skipped_with_its_reason(peers, monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # `import learn2learn` raises
    module, reason = peers.load_learn2learn()
    assert module is None
    assert "learn2learn not importable" in reason

    config = tiny(peers, inner_steps=1)
    specs, skipped = peers.contender_specs(config, module, reason, time_bf16=False)
    assert [spec.label for spec in specs][0] == "metalab loop fp32"  # the baseline
    assert all(spec.name != "learn2learn" for spec in specs)
    assert skipped == {"learn2learn fp32": reason}

    rows = peers.measure_config(
        config, specs, skipped, check_tasks=2, warmup=0, rounds=2, bf16_native=False
    )
    by_label = {f"{row['contender']} {row['precision']}": row for row in rows}
    assert by_label["learn2learn fp32"]["status"] == f"skipped: {reason}"
    assert {row["baseline"] for row in rows} == {"metalab loop fp32"}
    for label in ("metalab loop fp32", "metalab vectorised fp32", "torch.func fp32"):
        assert by_label[label]["status"] == "timed"
        assert by_label[label]["max_rel_error"] < peers.GRADIENT_TOLERANCE
    assert by_label["metalab loop fp32"]["ratio_median"] == 1.0
    assert by_label["metalab vectorised bf16"]["status"].startswith("not timed: bf16")


def timed_row(config: str, contender: str, ratio: float, precision: str = "fp32") -> dict:
    baseline = "learn2learn fp32" if config == "maml" else "metalab loop fp32"
    return {
        "config": config,
        "contender": contender,
        "precision": precision,
        "status": "timed",
        "baseline": baseline,
        "ratio_median": ratio,
    }


def test_targets_compare_metalab_with_the_fastest_peer_and_learn2learn(peers):
    rows = [
        timed_row("maml", "learn2learn", 1.0),
        timed_row("maml", "metalab loop", 0.99),
        timed_row("maml", "metalab vectorised", 1.3),
        timed_row("maml", "metalab vectorised", 1.6, "bf16"),
        timed_row("maml", "torch.func", 0.9),
        timed_row("protonets", "metalab loop", 1.0),
        timed_row("protonets", "plain", 1.05),
    ]
    checks = {(c["config"], c["target"]): c for c in peers.target_checks(rows, bf16_native=True)}
    peer = checks[("maml", "metalab >= fastest peer (learn2learn)")]
    assert peer["measured"] == pytest.approx(1.3) and peer["met"]
    fp32 = checks[("maml", "metalab vectorised fp32 >= 2.0x learn2learn")]
    assert fp32["measured"] == 1.3 and not fp32["met"]
    assert not checks[("maml", "metalab vectorised bf16 >= 3.0x learn2learn")]["met"]
    slower = checks[("protonets", "metalab >= fastest peer (plain)")]
    assert slower["measured"] == pytest.approx(1 / 1.05, abs=1e-3) and not slower["met"]
    # bf16 targets only where the CPU computes bf16 natively
    emulated = peers.target_checks(rows, bf16_native=False)
    assert not any("bf16" in c["target"] for c in emulated)


def test_op_categories_and_profile_count_each_op_once():
    sys.path.insert(0, str(SCRIPT.parent))
    import op_profile

    assert op_profile.category("aten::mkldnn_convolution") == "convolution"
    assert op_profile.category("aten::convolution_backward") == "convolution"
    assert op_profile.category("aten::native_batch_norm") == "batch norm"
    assert op_profile.category("aten::addmm") == "matmul"
    assert op_profile.category("aten::max_pool2d_with_indices") == "pooling"
    assert op_profile.category("aten::frobnicate") == "other"

    weight = torch.randn(8, 3, 3, 3, requires_grad=True)
    images = torch.randn(4, 3, 16, 16)

    def step() -> None:
        torch.nn.functional.conv2d(images, weight).relu().sum().backward()

    once = op_profile.profile_once(step)
    parts = sum(v for k, v in once.items() if k not in ("total", "ops"))
    assert once["total"] == pytest.approx(parts)
    assert once["convolution"] > 0 and once["ops"] > 0

    def twice() -> None:
        step()
        step()

    one, two = op_profile.profile_paired([step, twice], rounds=3)
    assert two["ops"] == 2 * one["ops"]  # every op of every call counted, nothing twice
    everything_else = {"total": 100.0, "convolution": 40.0}
    assert op_profile.convolution_bound(everything_else, {"convolution": 25.0}) == 4.0
