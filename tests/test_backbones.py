"""Backbone names, truncation, weights resolution and the original's BatchNorm warm-up."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

from patchcore_lightning.backbones import (
    BACKBONES,
    LayerError,
    WeightsError,
    build_feature_extractor,
    file_sha256,
    load_backbone,
    load_feature_extractor,
    original_bn_warmup,
    resolve_weights_path,
)

from .bounds import chain_bound


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
    assert torch.equal(out["layer3"], captured["layer3"])  # the same modules on the same input: the same kernels
    assert out["layer2"].shape == (2, 128, 8, 8)


def test_densenet_dotted_layer_paths():
    model, _ = load_backbone("densenet201", "random")
    out = build_feature_extractor(model, ["features.denseblock2", "features.denseblock3"])(torch.randn(1, 3, 64, 64))
    assert out["features.denseblock2"].shape == (1, 512, 8, 8) and out["features.denseblock3"].shape == (1, 1792, 4, 4)
    with pytest.raises(ValueError, match=r"layers \['features.block9'\] not found"):
        build_feature_extractor(model, ["features.block9"])


def test_weights_mapping_names_a_missing_entry(resnet18_weights):
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
    # BatchNorm's own mean of the 16*16 values: another sum order, each within gamma_(256 + 3) of
    # 0.1 * mean |stem| (bounds.chain_bound)
    tolerance = chain_bound(256 + 3, 0.1 * stem.abs().mean(dim=(0, 2, 3)))
    assert bool(((bn.running_mean - expected_mean).abs() <= tolerance).all())
    assert not extractor.training and int(bn.num_batches_tracked) == 1
    assert int(model.layer3[0].bn1.num_batches_tracked) == 0  # past the last layer: untouched


# --------------------------------------------------------------------------- weights files
def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def resnet18_legacy_weights(resnet18_weights, tmp_path_factory):
    """The same weights in torch's pre-1.6 (non-zip) format, as torchvision's WideResNet50 ImageNet file."""
    path = tmp_path_factory.mktemp("legacy") / "resnet18_seed0_legacy.pth"
    torch.save(torch.load(resnet18_weights, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:4] != b"PK\x03\x04"
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_file_extractor_has_the_files_weights_and_nothing_after_the_last_layer(
    kind, resnet18_weights, resnet18_legacy_weights
):
    path = str(resnet18_weights if kind == "zip" else resnet18_legacy_weights)
    extractor, digest = load_feature_extractor("resnet18", ["layer2", "layer3"], path)
    assert digest == file_sha256(path)
    state = torch.load(resnet18_weights, weights_only=True)
    assert all(torch.equal(t, state[k]) for k, t in extractor.state_dict().items())
    assert not any(n.startswith(("layer4", "fc")) for n, _ in extractor.named_modules())
    assert not any(t.is_meta for t in extractor.state_dict().values())
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())


def test_random_extractor_is_the_cut_of_the_seeded_full_build():
    extractor, digest = load_feature_extractor("resnet18", ["layer1", "layer2"], "random")
    full = build_feature_extractor(load_backbone("resnet18", "random")[0], ["layer1", "layer2"])
    assert digest is None and _state_equal(extractor, full)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = torchvision.models.resnet18(weights=None)
    assert torch.equal(extractor.state_dict()["layer2.1.conv2.weight"], reference.layer2[1].conv2.weight)


def test_file_without_batchnorm_counters_loads_as_torch_load_does(tmp_path, resnet18_weights):
    # files saved before torch 0.4.1 have no num_batches_tracked; load_state_dict fills it in
    state = {k: v for k, v in torch.load(resnet18_weights, weights_only=True).items() if "num_batches" not in k}
    path = tmp_path / "old.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    extractor, _ = load_feature_extractor("resnet18", ["layer2"], str(path))
    assert int(extractor.state_dict()["layer2.0.bn1.num_batches_tracked"]) == 0
    assert torch.equal(extractor.state_dict()["layer2.0.bn1.running_var"], state["layer2.0.bn1.running_var"])


def test_file_weights_of_another_dtype_compute_in_float32(tmp_path, resnet18_weights):
    state = torch.load(resnet18_weights, weights_only=True)
    path = tmp_path / "double.pth"
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, path)
    extractor, _ = load_feature_extractor("resnet18", ["layer1"], str(path))
    assert extractor.state_dict()["layer1.0.conv1.weight"].dtype == torch.float32
    assert torch.equal(extractor.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_weights_errors_are_one_line_naming_the_file(tmp_path, resnet18_weights, resnet18_legacy_weights):
    with pytest.raises(WeightsError, match="not found"):
        load_feature_extractor("resnet18", ["layer2"], str(tmp_path / "missing.pth"))
    for legacy in (False, True):
        torch.save([1, 2, 3], tmp_path / "list.pth", _use_new_zipfile_serialization=not legacy)
        with pytest.raises(WeightsError, match=f"backbone weights {tmp_path / 'list.pth'} are not a state_dict"):
            load_feature_extractor("resnet18", ["layer2"], str(tmp_path / "list.pth"))
    (tmp_path / "garbage.pth").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(WeightsError) as garbage:
        load_feature_extractor("resnet18", ["layer2"], str(tmp_path / "garbage.pth"))
    message = str(garbage.value)
    assert "\n" not in message and len(message) < 300, message
    assert message.startswith(f"backbone weights {tmp_path / 'garbage.pth'} are not a state_dict"), message
    assert "weights_only" not in message  # torch's hint about unpickling is not what the user needs
    torch.save(torchvision.models.resnet18(), tmp_path / "model.pth")  # a whole pickled model
    with pytest.raises(WeightsError, match=r"model.pth are not a state_dict: .*\(Unsupported global: .*ResNet\)$"):
        load_feature_extractor("resnet18", ["layer2"], str(tmp_path / "model.pth"))
    for path in (resnet18_weights, resnet18_legacy_weights):
        with pytest.raises(WeightsError) as other:
            load_feature_extractor("resnet50", ["layer2"], str(path))
        message = str(other.value)
        assert "\n" not in message and len(message) < 300, message
        assert re.fullmatch(
            rf"backbone weights {re.escape(str(path))} do not fit 'resnet50' \(resnet50\): (\d+) keys missing, "
            r"(\d+) unexpected, (\d+) of another shape \(e\.g\. [\w.]+, [\w.]+\)", message
        ), message
        missing, unexpected, misshapen = map(int, re.findall(r"(\d+) (?:keys missing|unexpected|of another)", message))
        assert (missing, unexpected, misshapen) == (_mismatch("resnet50", path))
    with pytest.raises(LayerError, match=r"layers \['layer9'\] not found in ResNet"):
        load_feature_extractor("resnet18", ["layer9"], str(resnet18_weights))


def _mismatch(name: str, path) -> tuple[int, int, int]:
    """What torch's strict load_state_dict reports, counted: missing, unexpected, size mismatches."""
    model = getattr(torchvision.models, BACKBONES[name][0])(weights=None)
    state = torch.load(path, weights_only=True)
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]  # these are filled in
    misshapen = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    return len(missing), len(unexpected), len(misshapen)
