"""Backbone names, truncation, weights resolution and the original's BatchNorm warm-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from patchcore_lightning import backbones
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


# --------------------------------------------------------------------------- truncated builds
def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def resnet18_legacy_weights(resnet18_weights, tmp_path_factory):
    """The same weights in torch's pre-1.6 (non-zip) format, as torchvision's oldest ImageNet files."""
    path = tmp_path_factory.mktemp("legacy") / "resnet18_seed0_legacy.pth"
    torch.save(torch.load(resnet18_weights, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:4] != b"PK\x03\x04"
    return path


@pytest.mark.parametrize(
    "name, layers",
    [
        ("resnet18", ["layer2", "layer3"]),
        ("resnet18", ["layer1"]),
        ("resnet50", ["layer2", "layer3"]),
        ("densenet201", ["features.denseblock2", "features.denseblock3"]),
    ],
)
def test_random_extractor_has_the_full_builds_weights_bit_for_bit(name, layers):
    extractor, digest = load_feature_extractor(name, layers, "random")
    full = build_feature_extractor(load_backbone(name, "random")[0], layers)
    assert digest is None and _state_equal(extractor, full)
    last = layers[-1]
    after = ("layer4", "fc", "classifier", "features.denseblock4", "features.transition3")
    assert not any(n.startswith(after) for n, _ in extractor.named_modules())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(extractor(x)[last], full(x)[last])


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_file_extractor_has_the_files_weights_and_nothing_after_the_last_layer(
    kind, resnet18_weights, resnet18_legacy_weights
):
    path = str(resnet18_weights if kind == "zip" else resnet18_legacy_weights)
    extractor, digest = load_feature_extractor("resnet18", ["layer2", "layer3"], path)
    full, full_digest = load_backbone("resnet18", path)
    assert digest == full_digest == file_sha256(path)
    assert _state_equal(extractor, build_feature_extractor(full, ["layer2", "layer3"]))
    state = torch.load(resnet18_weights, weights_only=True)
    assert all(torch.equal(t, state[k]) for k, t in extractor.state_dict().items())
    assert not any(n.startswith(("layer4", "fc")) for n, _ in extractor.named_modules())
    assert not any(t.is_meta for t in extractor.state_dict().values())


def test_legacy_file_without_batchnorm_counters_loads_as_torch_load_does(tmp_path, resnet18_weights):
    # files saved before torch 0.4.1 have no num_batches_tracked; load_state_dict fills it in
    state = {k: v for k, v in torch.load(resnet18_weights, weights_only=True).items() if "num_batches" not in k}
    path = tmp_path / "old.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    extractor, _ = load_feature_extractor("resnet18", ["layer2"], str(path))
    assert _state_equal(extractor, build_feature_extractor(load_backbone("resnet18", str(path))[0], ["layer2"]))
    assert int(extractor.state_dict()["layer2.0.bn1.num_batches_tracked"]) == 0


def test_file_weights_of_another_dtype_are_converted_as_a_copy_would(tmp_path, resnet18_weights):
    state = torch.load(resnet18_weights, weights_only=True)
    path = tmp_path / "double.pth"
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, path)
    extractor, _ = load_feature_extractor("resnet18", ["layer1"], str(path))
    assert extractor.state_dict()["layer1.0.conv1.weight"].dtype == torch.float32
    assert torch.equal(extractor.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_truncated_builds_keep_the_weights_errors(tmp_path, resnet18_weights, resnet18_legacy_weights):
    with pytest.raises(WeightsError, match="not found"):
        load_feature_extractor("resnet18", ["layer2"], str(tmp_path / "missing.pth"))
    for legacy in (False, True):
        torch.save([1, 2, 3], tmp_path / "list.pth", _use_new_zipfile_serialization=not legacy)
        with pytest.raises(WeightsError, match="not a state_dict"):
            load_feature_extractor("resnet18", ["layer2"], str(tmp_path / "list.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read backbone weights"):
        load_feature_extractor("resnet18", ["layer2"], str(tmp_path / "garbage.pth"))
    for path in (resnet18_weights, resnet18_legacy_weights):
        with pytest.raises(WeightsError, match="do not fit 'resnet50'"):
            load_feature_extractor("resnet50", ["layer2"], str(path))
    with pytest.raises(LayerError, match=r"layers \['layer9'\] not found in ResNet"):
        load_feature_extractor("resnet18", ["layer9"], str(resnet18_weights))
    with pytest.raises(LayerError, match=r"layers \['layer9'\] not found in ResNet"):
        load_feature_extractor("resnet18", ["layer9"], "random")


class _Net(nn.Module):
    """A kept part (body) built before a dropped one (head), both drawing from the RNG."""

    def __init__(self, cpu_only_op: bool = False, tie: bool = False) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3)
        if cpu_only_op and not self.body.weight.is_meta:
            torch.zeros(3)  # one op more on the CPU than on the meta device
        self.head = nn.Linear(8, 4)
        if tie:
            with torch.no_grad():
                self.body.bias.copy_(self.head.bias[:1].repeat(8))  # a kept tensor from a dropped one
        nn.init.normal_(self.body.weight)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("kwargs, replayed", [({}, True), ({"cpu_only_op": True}, False), ({"tie": True}, False)])
def test_random_replay_equals_a_full_build_or_falls_back_to_one(kwargs, replayed, caplog):
    def constructor(weights=None):
        return _Net(**kwargs)

    with caplog.at_level("INFO", logger="patchcore_lightning.backbones"):
        extractor = backbones._build_seeded_prefix(constructor, ["body"], seed=3)
    full = build_feature_extractor(backbones._build_seeded(constructor, 3), ["body"])
    assert _state_equal(extractor, full)
    assert ("building all of" not in caplog.text) == replayed


_RSS_PROBE = """
import sys
import torch, torchvision
from patchcore_lightning.backbones import load_feature_extractor
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS")
extractor, _ = load_feature_extractor("wideresnet50", ["layer2", "layer3"], sys.argv[1])
print(status("VmHWM") - before)
"""


@pytest.fixture(scope="module")
def wideresnet50_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wrn50")
    state = load_backbone("wideresnet50", "random")[0].state_dict()
    torch.save(state, folder / "zip.pth")
    torch.save(state, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("kind", ["random", "zip", "legacy"])
def test_wideresnet50_extractor_never_holds_the_layers_after_layer3(kind, wideresnet50_files):
    # WideResNet50 is 263 MB of float32, 95 MB up to layer3; a full build peaks 263 MB and more
    # above the RSS before it. The truncated build: the kept 95 MB (none yet for a memory-mapped
    # file) and, for random weights, one throw-away tensor of layer4 (36 MB) at a time.
    weights = "random" if kind == "random" else str(wideresnet50_files / f"{kind}.pth")
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, weights], capture_output=True, text=True, check=False)
    if probe.returncode != 0 and "clear_refs" in probe.stderr:
        pytest.skip(f"cannot reset the RSS high-water mark: {probe.stderr.strip().splitlines()[-1]}")
    assert probe.returncode == 0, probe.stderr
    assert float(probe.stdout.split()[-1]) < 180
