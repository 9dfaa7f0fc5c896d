"""Backbone names, truncation, weights resolution and the original's BatchNorm warm-up."""

from __future__ import annotations

import pytest
import torch
import torchvision

from patchcore_lightning.backbones import (
    BACKBONES,
    WeightsError,
    build_feature_extractor,
    load_backbone,
    original_bn_warmup,
    resolve_weights_path,
)


def test_unknown_backbone_lists_the_supported_names():
    with pytest.raises(ValueError, match="unsupported backbone 'vgg16'; supported: densenet201, resnet101, resnet18"):
        load_backbone("vgg16", "random")


def test_names_map_to_torchvision_constructors():
    assert {k: v[0] for k, v in BACKBONES.items()} == {
        "resnet18": "resnet18",
        "resnet50": "resnet50",
        "resnet101": "resnet101",
        "resnext101": "resnext101_32x8d",
        "wideresnet50": "wide_resnet50_2",
        "wideresnet101": "wide_resnet101_2",
        "densenet201": "densenet201",
    }


def test_extractor_stops_after_the_last_layer_and_matches_the_full_model(resnet18_weights):
    model, digest = load_backbone("resnet18", str(resnet18_weights))
    assert len(digest) == 64
    extractor = build_feature_extractor(model, ["layer2", "layer3"])
    assert not any(name.startswith(("layer4", "fc", "avgpool")) for name, _ in extractor.named_modules())
    x = torch.randn(2, 3, 64, 64)
    captured = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in ("layer2", "layer3")]
    with torch.no_grad():
        model(x)
        out = extractor(x)
    for h in hooks:
        h.remove()
    assert set(out) == {"layer2", "layer3"}
    torch.testing.assert_close(out["layer3"], captured["layer3"])
    assert out["layer2"].shape == (2, 128, 8, 8)


def test_densenet_dotted_layer_paths():
    model, _ = load_backbone("densenet201", "random")
    out = build_feature_extractor(model, ["features.denseblock2", "features.denseblock3"])(torch.randn(1, 3, 64, 64))
    assert out["features.denseblock2"].shape == (1, 512, 8, 8) and out["features.denseblock3"].shape == (1, 1792, 4, 4)
    with pytest.raises(ValueError, match=r"layers \['features.block9'\] not found"):
        build_feature_extractor(model, ["features.block9"])


def test_weights_errors(tmp_path, resnet18_weights):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("resnet18", str(tmp_path / "missing.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state_dict"):
        load_backbone("resnet18", str(tmp_path / "list.pth"))
    with pytest.raises(WeightsError, match="do not fit 'resnet50'"):
        load_backbone("resnet50", str(resnet18_weights))
    with pytest.raises(WeightsError, match="no entry for backbone 'resnet50'"):
        load_backbone("resnet50", {"resnet18": str(resnet18_weights)})


def test_imagenet_weights_come_from_torch_home_or_fail_clearly(tmp_path, monkeypatch, resnet18_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsError, match=r"ImageNet weights of 'resnet18' not found at .*resnet18-f37072fd.pth"):
        resolve_weights_path("resnet18", None)
    assert resolve_weights_path("resnet18", "imagenet_or_random") is None
    cache = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(resnet18_weights.read_bytes())
    assert resolve_weights_path("resnet18", None) == str(cache)
    assert resolve_weights_path("resnet18", "imagenet_or_random") == str(cache)


def test_random_weights_are_seeded_and_said(caplog):
    a, digest = load_backbone("resnet18", "random")
    b, _ = load_backbone("resnet18", "random")
    assert digest is None and torch.equal(a.conv1.weight, b.conv1.weight)
    assert "RANDOM weights" in caplog.text


def test_bn_warmup_replays_one_train_mode_forward_of_ones():
    model = torchvision.models.resnet18(weights=None)
    extractor = build_feature_extractor(model, ["layer2"])
    bn = model.bn1
    with torch.no_grad():
        stem = model.conv1(torch.ones(1, 3, 32, 32))
    expected_mean = 0.9 * torch.zeros(64) + 0.1 * stem.mean(dim=(0, 2, 3))
    original_bn_warmup(extractor, (3, 32, 32))
    torch.testing.assert_close(bn.running_mean, expected_mean)
    assert not extractor.training and int(bn.num_batches_tracked) == 1
    assert int(model.layer3[0].bn1.num_batches_tracked) == 0  # past the last layer: untouched
