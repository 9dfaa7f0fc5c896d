"""The model stands alone: ``PatchCore`` and ``evaluate`` from Python, without Lightning, give what the
CLI gives (the original's numbers, the DataModule's pixels, fit's banks bit for bit), change no
global state, and README's Python example runs."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_lightning import Evaluation, PatchCore, evaluate
from patchcore_lightning.cli import main
from patchcore_lightning.data.datamodule import AnomalyDataModule
from patchcore_lightning.model import Backbones, default_resize
from patchcore_lightning.model_io import read_params
from patchcore_lightning.reporting import read_results, read_thresholds

from .bounds import raw_metric_bounds
from .conftest import FIXTURE, fixture_args
from .test_original_fixture import _original_gap_bound, _raw_outputs

REPO = Path(__file__).resolve().parent.parent
ORIGINAL = np.load(FIXTURE / "original_outputs.npz")
META = json.loads((FIXTURE / "original_metrics.json").read_text())


@pytest.fixture(scope="module")
def weights(resnet18_weights):
    return resnet18_weights


def test_python_api_gives_the_originals_outputs_and_the_clis_rows(weights, tmp_path):
    """The original's folder with every default (imagesize from its params, the original's resize),
    PIL images through ``transform``, ``forward`` and ``evaluate``: the original's raw scores and
    metrics, and exactly results.csv and thresholds.csv of ``test`` on the same batches."""
    model = PatchCore.from_folder(FIXTURE / "model", backbone_weights=str(weights))
    assert (model.imagesize, model.resize) == (224, 256) == (224, default_resize(224))
    files = [FIXTURE / "data" / "weave" / name for name in META["image_names"]]
    images = torch.stack([model.transform(Image.open(f)) for f in files])  # (8, 3, 224, 224)
    masks = []
    for f, label in zip(files, ORIGINAL["labels"]):
        mask = f.parent.parent.parent / "ground_truth" / f.parent.name / f"{f.stem}_mask.png"
        masks.append(model.transform_mask(Image.open(mask)) if label else torch.zeros(224, 224, dtype=torch.uint8))
    with torch.no_grad():
        outputs = [model(batch) for batch in images.split(3)]  # the CLI's batches (fixture_args: 3)
    raw_scores = torch.cat([s for s, _ in outputs])  # (8, 1)
    raw_maps = torch.cat([m for _, m in outputs])  # (8, 1, 224, 224)
    assert raw_scores.shape == (8, 1) and raw_maps.shape == (8, 1, 224, 224)
    # the original's outputs within the rounding bounds test_original_fixture derives from the data
    reference = _raw_outputs(weights, warmup=True)
    assert bool((np.abs(raw_scores[:, 0].double().numpy() - ORIGINAL["image_scores"]) <= _original_gap_bound(reference)).all())
    result = evaluate(raw_scores, raw_maps, torch.as_tensor(ORIGINAL["labels"]), torch.stack(masks))
    assert isinstance(result, Evaluation)
    # the metrics: within what the raw outputs' differences from the original's, pixel by pixel, can
    # reorder (bounds.raw_metric_bounds), so the metric code itself is held to ~2e-5 (AUROCs) and
    # ~1e-7 (AUPROs) here, not to the a priori rounding bounds above (which allow whole percents)
    scores, maps = raw_scores[:, 0].double().numpy(), raw_maps[:, 0].double().numpy()
    score_shift = np.abs(scores - ORIGINAL["image_scores"])  # (8,)
    map_shift = np.abs(maps - ORIGINAL["segmentations"])  # (8, 224, 224): each pixel's
    labels = ORIGINAL["labels"].astype(bool)
    bounds = raw_metric_bounds(scores, maps, torch.stack(masks).numpy() == 255, labels, labels, score_shift, map_shift)
    # a check, not a formality: the shifts are mostly the rounding stored in the original's outputs (its
    # faiss formula and its backbone, ~1e-5 of a score, fixed in the fixture whatever CPU runs this); ours
    # adds ~1e-6 of a score (test_agreement: features a few u from float64), so the bounds (1.7e-5 and
    # 6.3e-8 here) stay far below these limits on any CPU
    assert bounds["full_pixel_auroc"] < 1e-3 and bounds["full_pro"] < 1e-4
    for name, value in META["metrics"].items():
        assert abs(getattr(result, name) - value) <= bounds[name], (name, getattr(result, name), value, bounds[name])
    main(["test", *fixture_args(weights, tmp_path, "--trainer.logger", "false")])
    assert read_results(tmp_path / "results.csv")["mvtec_weave"] == result.metrics()
    assert read_thresholds(tmp_path / "thresholds.csv")["mvtec_weave"] == {
        k: v for k, v in result.row().items() if k not in result.metrics()
    }


def _image_zoo(root: Path) -> list[Path]:
    """The fixture's images in the formats predict reads: PNG, gray, palette, RGBA, JPEG, BMP, TIFF."""
    sources = sorted((FIXTURE / "data" / "weave" / "test").rglob("*.png"))
    root.mkdir(parents=True, exist_ok=True)
    out = []
    modes = {"png": "RGB", "gray": "L", "palette": "P", "rgba": "RGBA", "jpg": "RGB", "bmp": "RGB", "tif": "RGB"}
    for i, (source, kind) in enumerate(zip(sources, ["png", "gray", "palette", "rgba", "jpg", "bmp", "tif", "png"])):
        suffix = "png" if kind in ("gray", "palette", "rgba") else kind
        path = root / f"{i}_{kind}.{suffix}"
        Image.open(source).convert("RGB").convert(modes[kind]).save(path)
        out.append(path)
    return out


def test_a_deep_copy_scores_as_the_model(weights):
    """copy.deepcopy of a model (its backbones are torch.fx GraphModules, which torch.fx rebuilds in
    train mode) gives the model's outputs, bit for bit: BatchNorm keeps its running statistics."""
    import copy

    model = PatchCore.from_folder(FIXTURE / "model", backbone_weights=str(weights))
    files = [FIXTURE / "data" / "weave" / name for name in META["image_names"][:3]]
    images = torch.stack([model.transform(Image.open(f)) for f in files])
    copied = copy.deepcopy(model)
    assert not any(e.training for e in copied.extractors)
    with torch.no_grad():
        for ours, theirs in zip(model(images), copied(images)):
            assert torch.equal(ours, theirs)


def test_transform_gives_the_datamodules_tensors(tmp_path):
    model = PatchCore.from_folder(FIXTURE / "model", backbone_weights="random")
    dm = AnomalyDataModule(root=str(FIXTURE / "data"), categories=["weave"], resize=model.resize,
                           imagesize=model.imagesize, predict_dir=str(tmp_path / "zoo"))
    dm.setup("test")
    for index, sample in enumerate(dm.test_dataset.samples):
        image, mask, _, _ = dm.test_dataset[index]
        assert torch.equal(model.transform(Image.open(sample.image)), image), sample.image
        if sample.mask is not None:
            assert torch.equal(model.transform_mask(Image.open(sample.mask)), mask), sample.mask
    files = _image_zoo(tmp_path / "zoo")
    dm.setup("predict")
    assert len(dm.predict_dataset) == len(files)
    for index in range(len(files)):
        image, _, error = dm.predict_dataset[index]
        path = tmp_path / "zoo" / dm.predict_dataset.relative(index)
        assert not error and torch.equal(model.transform(Image.open(path)), image), path
    with pytest.raises(TypeError, match="PIL image"):
        model.transform(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="not both"):
        PatchCore.from_folder(FIXTURE / "model", backbones=Backbones("random"), backbone_weights="random")


def _cli_fit(root, weights, out, seed):
    main(["fit", "--data.root", str(root), "--data.categories", "[alpha]", "--data.resize", "72",
          "--data.imagesize", "64", "--data.num_workers", "0", "--data.batch_size", "2",
          "--model.backbone_weights", str(weights), "--model.backbones", "[resnet18]",
          "--model.pretrain_embed_dimension", "96", "--model.target_embed_dimension", "64",
          "--model.percentage", "0.25", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
          "--seed_everything", str(seed), "--results_dir", str(out)])
    return out / "models" / "mvtec_alpha"


def test_fit_without_lightning_writes_the_clis_bank_bit_for_bit(tmp_path, mvtec_root, resnet18_weights):
    cli_folder = _cli_fit(mvtec_root, resnet18_weights, tmp_path / "cli", seed=3)
    train = sorted((mvtec_root / "alpha" / "train" / "good").glob("*.png"))
    settings = dict(backbones=["resnet18"], layers=["layer2", "layer3"], percentage=0.25, pretrain_embed_dimension=96,
                    target_embed_dimension=64, backbone_weights=str(resnet18_weights), imagesize=64, resize=72,
                    batch_size=2)
    model = PatchCore.fit([Image.open(p) for p in train], seed=3, **settings)
    folder = model.save(tmp_path / "python")
    for name in ("nnscorer_search_index.faiss", "patchcore_params.pkl"):
        assert (folder / name).read_bytes() == (cli_folder / name).read_bytes(), name
    # the same images as a tensor of transformed images: the same bank
    images = torch.stack([model.transform(Image.open(p)) for p in train])
    again = PatchCore.fit(images, seed=3, **settings)
    assert torch.equal(again.banks[0].vectors, model.banks[0].vectors)
    # the seed is the one passed in: another seed, another bank
    other = PatchCore.fit(images, seed=0, **settings)
    assert len(other.banks[0]) == len(model.banks[0])
    assert not torch.equal(other.banks[0].vectors, model.banks[0].vectors)
    # the original reads the folder (plain pickle, faiss); ours reads it back with its resize and weights check
    with open(folder / "patchcore_params.pkl", "rb") as handle:
        assert pickle.load(handle) == read_params(cli_folder / "patchcore_params.pkl").to_original()
    index = faiss.read_index(str(folder / "nnscorer_search_index.faiss"))
    assert index.ntotal == 48 and index.d == 64  # int(3 images * 8 * 8 patches * 0.25)
    sidecar = json.loads((folder / "patchcore_lightning.json").read_text())
    assert sidecar["seed"] == 3 and sidecar["n_train_images"] == 3 and sidecar["resize"] == 72
    loaded = PatchCore.from_folder(folder, backbone_weights=str(resnet18_weights))
    assert (loaded.imagesize, loaded.resize) == (64, 72)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(images), model(images)))
    with pytest.raises(Exception, match="random weights"):  # the sidecar's sha256 of the weights is checked
        PatchCore.from_folder(folder, backbone_weights="random")


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match=r"percentage must be in \(0, 1\], got 0"):
        PatchCore.fit(torch.zeros(1, 3, 64, 64), percentage=0)
    with pytest.raises(ValueError, match=r"fit takes images \(B, 3, 64, 64\), got a batch of shape \(1, 3, 32, 32\)"):
        PatchCore.fit(torch.zeros(1, 3, 32, 32), imagesize=64, backbones=["resnet18"], backbone_weights="random")
    with pytest.raises(ValueError, match="backbones must be a non-empty list"):
        PatchCore.fit(torch.zeros(1, 3, 64, 64), backbones="resnet18")


_GLOBAL_STATE = """
import inspect, sys, warnings
import torch

torch.backends.cuda.matmul.allow_tf32 = True  # both flags away from torch's defaults: any setting shows
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(1234)
# Libraries torch imports lazily (sympy for FX tracing, scipy) add filters of their own: every call of
# warnings' setters is recorded with its caller and the entry it made, so that ours can be told apart.
ours, theirs = [], set()

def recording(setter):
    def call(*args, **kwargs):
        caller = inspect.stack()[1].frame.f_globals.get("__name__", "")
        result = setter(*args, **kwargs)
        if caller.split(".")[0] == "patchcore_lightning":
            ours.append(caller)
        elif warnings.filters:
            theirs.add(warnings.filters[0])
        return result
    return call

for setter in ("filterwarnings", "simplefilter", "resetwarnings"):
    setattr(warnings, setter, recording(getattr(warnings, setter)))

def state():
    return (set(warnings.filters), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_rng_state(), torch.get_num_threads())

before = state()
from PIL import Image
from patchcore_lightning import PatchCore
model = PatchCore.from_folder(sys.argv[1], backbone_weights="random")
images = torch.stack([model.transform(Image.open(p)) for p in sys.argv[2:4]])
with torch.no_grad():
    model(images)
PatchCore.fit(images, backbones=["resnet18"], pretrain_embed_dimension=96, target_embed_dimension=64,
              percentage=0.5, backbone_weights="random", sampler="random")
after = state()
print("filters set by the package:", ours)
print("filters removed:", before[0] - after[0], "unexplained:", after[0] - before[0] - theirs)
for name, b, a in zip(["matmul.allow_tf32", "cudnn.allow_tf32", "rng", "threads"], before[1:], after[1:]):
    same = torch.equal(b, a) if isinstance(b, torch.Tensor) else b == a
    print(name, "unchanged" if same else f"CHANGED: {b!r} -> {a!r}")
"""


def test_the_package_and_the_model_change_no_global_state():
    """Importing the package, from_folder, forward and fit (random sampler included) leave the warning
    filters, the TF32 flags, the torch RNG and the thread count as they found them: that is the CLI's business."""
    images = sorted((FIXTURE / "data" / "weave" / "test" / "good").glob("*.png"))[:2]
    out = subprocess.run([sys.executable, "-c", _GLOBAL_STATE, str(FIXTURE / "model"), *map(str, images)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:-1] == [
        "filters set by the package: []",
        "filters removed: set() unexplained: set()",
        *(f"{name} unchanged" for name in ["matmul.allow_tf32", "cudnn.allow_tf32", "rng", "threads"]),
    ], out.stdout


def test_readme_python_blocks_run_on_the_demo_data(tmp_path):
    """Every ```python block of README.md, in order, as one script in an empty folder (offline)."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)
    assert blocks, "README.md has no python block"
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
