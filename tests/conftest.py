"""Shared test material: small MVTec-format trees, seeded backbone weights, original-format models."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "original_resnet18_weave"

# The backbone of the original's fixture model: torchvision's resnet18(weights=None) right after
# torch.manual_seed(0) (torch 2.14.1, torchvision 0.29.1), shipped up to layer3, the last layer the
# model uses (conv1, bn1, layer1-3: 2,787,279 values), so that the parity tests run on any platform,
# whatever weights another torch or CPU would draw for seed 0.
RESNET18_TO_LAYER3 = FIXTURE / "resnet18_seed0_to_layer3.pth"
# sha256 over (name, tensor bytes) of the shipped tensors, and of the whole seed-0 resnet18 they come from
RESNET18_TO_LAYER3_TENSOR_SHA256 = "488f1216a69bda11e2d0ae7a752bb00334bc1f33c1e9a35e4ffdf9513861ae9b"
RESNET18_SEED0_TENSOR_SHA256 = "31c7602f43fb64ce98a024d3c589367bd38ee241f60cd25ea800ff808d0dbf96"


def fixture_args(weights: Path, results_dir: Path, *extra: str) -> list[str]:
    """CLI arguments that evaluate the original's fixture model on its weave data, on the CPU."""
    return [
        "--data.root", str(FIXTURE / "data"),
        "--data.categories", "[weave]",
        "--data.num_workers", "0",
        "--data.batch_size", "3",
        "--model.model_paths", f"[{FIXTURE / 'model'}]",
        "--model.backbone_weights", str(weights),
        "--trainer.accelerator", "cpu",
        "--results_dir", str(results_dir),
        *extra,
    ]


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def seed0_resnet18_state() -> dict[str, torch.Tensor]:
    """resnet18(weights=None) after torch.manual_seed(0) on this platform (the RNG stream is not kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    """The fixture model's resnet18 weights as a full state_dict file: the shipped tensors up to layer3,
    checked against their sha256; layer4 and fc, which no extractor cut at layer3 runs, from this
    platform's seed-0 draw (only their shapes matter)."""
    shipped = torch.load(RESNET18_TO_LAYER3, map_location="cpu", weights_only=True)
    digest = state_dict_sha256(shipped)
    assert digest == RESNET18_TO_LAYER3_TENSOR_SHA256, f"{RESNET18_TO_LAYER3} is damaged (tensor sha256 {digest})"
    state = {**seed0_resnet18_state(), **shipped}
    path = tmp_path_factory.mktemp("weights") / "resnet18_seed0.pth"
    torch.save(state, path)
    return path


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    f = rng.uniform(0.5, 0.7)
    phase = rng.uniform(0, 2 * np.pi, 2)
    base = 120 + 40 * np.sin(f * xx + phase[0]) * np.cos(f * yy + phase[1]) + rng.normal(0, 12, (size, size))
    return np.clip(np.stack([base, base * 0.8, base * 0.6], -1), 0, 255)


def make_mvtec_tree(
    root: Path,
    categories: tuple[str, ...] = ("alpha", "beta"),
    size: int = 80,
    n_train: int = 3,
    n_good: int = 3,
    defects: tuple[str, ...] = ("crack", "stain"),
    n_per_defect: int = 2,
    seed: int = 0,
) -> Path:
    """A small MVTec AD tree with drawn defects and 0/255 masks; deterministic for a seed."""
    rng = np.random.default_rng(seed)

    def save(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)

    for category in categories:
        for i in range(n_train):
            save(root / category / "train" / "good" / f"{i:03d}.png", _texture(rng, size))
        for i in range(n_good):
            save(root / category / "test" / "good" / f"{i:03d}.png", _texture(rng, size))
        for d, defect in enumerate(defects):
            for i in range(n_per_defect):
                image = _texture(rng, size)
                yy, xx = np.mgrid[:size, :size]
                cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                r = rng.integers(size // 10, size // 6)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                image[mask] = image[mask] * (0.4 if d == 0 else 1.5) + (10 if d == 0 else 40)
                save(root / category / "test" / defect / f"{i:03d}.png", image)
                save(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    return make_mvtec_tree(tmp_path_factory.mktemp("mvtec"))


def original_params(
    backbone: str = "resnet18",
    layers: tuple[str, ...] = ("layer2", "layer3"),
    imagesize: int = 64,
    pretrain: int = 96,
    target: int = 64,
    patchsize: int = 3,
    num_nn: int = 1,
) -> dict:
    """A params dict exactly as the original pickles it."""
    return {
        "backbone.name": backbone,
        "layers_to_extract_from": layers,
        "input_shape": (3, imagesize, imagesize),
        "pretrain_embed_dimension": pretrain,
        "target_embed_dimension": target,
        "patchsize": patchsize,
        "patchstride": 1,
        "anomaly_scorer_num_nn": num_nn,
    }


def write_original_model(folder: Path, members: list[tuple[dict, np.ndarray]]) -> Path:
    """Write a model folder the way the original's ``save_to_path`` does (pickle dict + faiss file)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(members)
    for i, (params, bank) in enumerate(members, start=1):
        prefix = "" if n == 1 else f"Ensemble-{i}-{n}_"
        with open(folder / f"{prefix}patchcore_params.pkl", "wb") as handle:
            pickle.dump(params, handle, pickle.HIGHEST_PROTOCOL)
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank, dtype=np.float32))
        faiss.write_index(index, str(folder / f"{prefix}nnscorer_search_index.faiss"))
    return folder
