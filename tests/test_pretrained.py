"""Starting bodies (``experiments.<name>.body_init``): a random start, a weights file and the
pretrain stage's output; supervised pretraining itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from metalab.algorithms.functional import use_batch_statistics
from metalab.algorithms.pretrain import pretrain_body
from metalab.models import Conv4, ModelConfig, ResNet18
from metalab.models.pretrained import load_body_init

SIZE = 16


def rgb_resnet18_state(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_file_source_loads_an_rgb_resnet18_state_dict(tmp_path: Path):
    state = rgb_resnet18_state(tmp_path / "resnet18_rgb.pt")
    model = ResNet18(5)
    use_batch_statistics(model)  # as the MAML family builds it
    head_before = model.head.weight.detach().clone()
    load_body_init(model, "resnet18_rgb.pt", tmp_path)
    torch.testing.assert_close(model.body.conv1.weight, state["conv1.weight"].mean(1, keepdim=True))
    torch.testing.assert_close(
        model.body.layer4[0].downsample[0].weight, state["layer4.0.downsample.0.weight"]
    )
    assert torch.equal(model.head.weight, head_before)


def test_file_source_loads_a_conv4_body_from_a_whole_model_state_dict(tmp_path: Path):
    torch.manual_seed(0)
    trained = Conv4(7, SIZE, hidden=8)
    torch.save(trained.state_dict(), tmp_path / "conv4.pt")  # body.* and a 7-way head.*
    model = Conv4(5, SIZE, hidden=8)
    head_before = model.head.weight.detach().clone()
    load_body_init(model, "conv4.pt", tmp_path)
    for name, value in trained.body.state_dict().items():
        torch.testing.assert_close(model.body.state_dict()[name], value)
    assert torch.equal(model.head.weight, head_before)
    with pytest.raises(ValueError, match="do not fit"):
        load_body_init(Conv4(5, SIZE, hidden=4), "conv4.pt", tmp_path)


def test_random_start_leaves_the_model_alone(tmp_path: Path):
    model = Conv4(5, SIZE, hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_body_init(model, "src/metalab/models", tmp_path)
    load_body_init(model, "src/metalab/models/", tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_files_give_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="pretrain stage first"):
        load_body_init(Conv4(5, SIZE), "models/pretrain", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"absent\.pt does not exist.*weights file"):
        load_body_init(Conv4(5, SIZE), "absent.pt", tmp_path)


def glyph_dataset(classes: int = 4, per_class: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, S, S] images (255 = ink): fixed random glyphs with 10% of pixels flipped."""
    generator = torch.Generator().manual_seed(5)
    glyphs = torch.rand(classes, SIZE, SIZE, generator=generator) < 0.3
    labels = torch.arange(classes).repeat_interleave(per_class) * 3 + 10  # arbitrary class ids
    flips = torch.rand(classes * per_class, SIZE, SIZE, generator=generator) < 0.1
    images = glyphs.repeat_interleave(per_class, dim=0) ^ flips
    return images.to(torch.uint8) * 255, labels


def nearest_centroid_accuracy(model: Conv4, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        features = model.features(images.unsqueeze(1).float() / 255)
    classes = labels.unique()
    centroids = torch.stack([features[labels == c].mean(0) for c in classes])
    predicted = classes[torch.cdist(features, centroids).argmin(1)]
    return (predicted == labels).float().mean().item()


def test_pretrain_body_learns_features_and_round_trips_through_the_background_file(tmp_path: Path):
    config = ModelConfig(name="conv4", hidden=8)
    images, labels = glyph_dataset()
    rng_before = torch.get_rng_state()
    kwargs = {"epochs": 6, "batch_size": 16, "lr": 0.01, "progress": False}
    state = pretrain_body(config, images, labels, seed=0, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    again = pretrain_body(config, images, labels, seed=0, **kwargs)
    other_seed = pretrain_body(config, images, labels, seed=1, **kwargs)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["0.0.weight"], other_seed["0.0.weight"])

    path = tmp_path / "models" / "pretrain" / "body.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": config.model_dump(), "image_size": SIZE, "body": state}, path)
    torch.manual_seed(3)
    pretrained = Conv4(5, SIZE, hidden=8)
    random_body_accuracy = nearest_centroid_accuracy(pretrained, images, labels)
    load_body_init(pretrained, "models/pretrain", tmp_path)
    assert all(torch.equal(pretrained.body.state_dict()[k], v) for k, v in state.items())
    pretrained_accuracy = nearest_centroid_accuracy(pretrained, images, labels)
    assert pretrained_accuracy >= 0.95 and pretrained_accuracy > random_body_accuracy
    with pytest.raises(ValueError, match="conv4"):
        load_body_init(ResNet18(5), "models/pretrain", tmp_path)
