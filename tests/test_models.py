"""Networks and the functional pieces the MAML family runs them with: Conv4 shapes, Meta
Dropout masks, the grouped (all tasks at once) Conv4 against the module run task by task,
BatchNorm written with plain ops, batch-statistics mode and ResNet18 weight loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from metalab.algorithms.functional import (
    batch_norm_twice_differentiable,
    conv4_grouped_features,
    linear_per_task,
    module_features,
    stack_for_tasks,
    use_batch_statistics,
)
from metalab.models import Conv4, ResNet18, draw_dropout_masks


@pytest.mark.parametrize(
    "image_size, downsample, feature_dim, last_block",
    [
        (28, "maxpool", 64, (64, 1, 1)),
        (28, "stride", 256, (64, 2, 2)),
        (105, "maxpool", 2304, (64, 6, 6)),
    ],
)
def test_conv4_shapes(image_size, downsample, feature_dim, last_block):
    model = Conv4(5, image_size, hidden=64, downsample=downsample)
    assert model.feature_dim == feature_dim
    assert model.block_output_shapes[-1] == last_block
    logits = model(torch.rand(3, 1, image_size, image_size))
    assert logits.shape == (3, 5)
    assert all(name.startswith(("body.", "head.")) for name, _ in model.named_parameters())


def test_dropout_masks_are_inverted_dropout_and_reproducible():
    shapes = [(4, 8, 8), (4, 4, 4), (4, 2, 2), (4, 1, 1)]
    masks = draw_dropout_masks(shapes, [0.25, 0.0, 0.5, 0.1], torch.Generator().manual_seed(0))
    assert masks[1] is None
    assert masks[0].shape == (1, 4, 8, 8)
    torch.testing.assert_close(masks[0].unique(), torch.tensor([0.0, 1 / 0.75]))
    again = draw_dropout_masks(shapes, [0.25, 0.0, 0.5, 0.1], torch.Generator().manual_seed(0))
    assert torch.equal(masks[2], again[2])
    many = draw_dropout_masks([(100, 10, 10)], [0.3], torch.Generator().manual_seed(1))[0]
    assert (many == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    with pytest.raises(ValueError):
        draw_dropout_masks(shapes, [0.1])


@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("twice_differentiable", [False, True])
def test_grouped_conv4_equals_the_module_task_by_task(
    downsample, channels_last, twice_differentiable
):
    torch.manual_seed(0)
    model = Conv4(3, 16, hidden=6, downsample=downsample).double()
    num_tasks, batch = 3, 4
    # Different weights per task: the meta-parameters plus a task-specific perturbation.
    stacked = {
        name: p.detach() + 0.1 * torch.randn(num_tasks, *p.shape, dtype=p.dtype)
        for name, p in model.named_parameters()
    }
    x = torch.rand(num_tasks, batch, 1, 16, 16, dtype=torch.float64)
    masks = [
        draw_dropout_masks(model.block_output_shapes, [0.3, 0.0, 0.2, 0.1], dtype=torch.float64)
        for _ in range(num_tasks)
    ]
    stacked_masks = [None if m[0] is None else torch.cat(m) for m in zip(*masks, strict=True)]
    grouped = conv4_grouped_features(
        model, stacked, x, stacked_masks, channels_last, twice_differentiable
    )
    assert grouped.shape == (num_tasks, batch, model.feature_dim)
    for task in range(num_tasks):
        params = {name: p[task] for name, p in stacked.items()}
        expected = module_features(model, params, x[task], masks[task])
        torch.testing.assert_close(grouped[task], expected, rtol=1e-10, atol=1e-12)


def test_grouped_batchnorm_statistics_never_mix_tasks():
    torch.manual_seed(0)
    model = Conv4(3, 16, hidden=4).double()
    params = stack_for_tasks(dict(model.named_parameters()), 2)
    x = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    shifted = x.clone()
    shifted[1] = shifted[1] * 3 + 1  # change task 1 only
    first = conv4_grouped_features(model, params, x)
    second = conv4_grouped_features(model, params, shifted)
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    assert not torch.allclose(first[1], second[1])


def test_twice_differentiable_batchnorm_equals_native_and_has_exact_second_derivatives():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    expected = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    torch.testing.assert_close(batch_norm_twice_differentiable(x, weight, bias, 1e-5), expected)

    def normalise(x, weight, bias):
        return batch_norm_twice_differentiable(x, weight, bias, 1e-5)

    assert torch.autograd.gradgradcheck(normalise, (x, weight, bias))


def test_linear_per_task_applies_each_tasks_head():
    features = torch.randn(3, 4, 5, dtype=torch.float64)
    weight = torch.randn(3, 2, 5, dtype=torch.float64)
    bias = torch.randn(3, 2, dtype=torch.float64)
    logits = linear_per_task(features, weight, bias)
    for task in range(3):
        torch.testing.assert_close(logits[task], F.linear(features[task], weight[task], bias[task]))


def test_batch_statistics_mode_behaves_the_same_in_train_and_eval():
    torch.manual_seed(0)
    model = ResNet18(4)
    use_batch_statistics(model)
    x = torch.rand(6, 1, 28, 28)
    train_logits = model.train()(x)
    eval_logits = model.eval()(x)
    torch.testing.assert_close(train_logits, eval_logits)
    assert not any("running" in key for key in model.state_dict())


def test_resnet18_loads_torchvision_weights_with_rgb_conv1_averaged():
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None).state_dict()
    for batch_statistics in (False, True):
        model = ResNet18(5)
        if batch_statistics:
            use_batch_statistics(model)  # running statistics in the file are then dropped
        head_before = model.head.weight.detach().clone()
        model.load_body_state_dict(source)
        torch.testing.assert_close(
            model.body.conv1.weight, source["conv1.weight"].mean(dim=1, keepdim=True)
        )
        torch.testing.assert_close(
            model.body.layer3[1].conv2.weight, source["layer3.1.conv2.weight"]
        )
        assert torch.equal(model.head.weight, head_before)
        if not batch_statistics:
            torch.testing.assert_close(model.body.bn1.running_var, source["bn1.running_var"])
    with pytest.raises(ValueError, match="do not fit"):
        ResNet18(5).load_body_state_dict({"layer9.weight": torch.zeros(1)})
