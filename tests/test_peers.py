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
