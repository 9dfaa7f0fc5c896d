"""An independent, deliberately plain transcription of the original patchcore-inspection evaluation.

Written from the original's code paths (forward hooks, PatchMaker, reshape chain, MeanMapper,
Aggregator, numpy faiss search, RescaleSegmentor with scipy, numpy normalisation, sklearn AUROC,
MVTec's compute_pro), sharing nothing with the package, so the tests compare two implementations.
"""

from __future__ import annotations

import pickle
from bisect import bisect
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy import ndimage
from sklearn import metrics
from torchvision import transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CONSTRUCTORS = {"resnet18": torchvision.models.resnet18, "wideresnet50": torchvision.models.wide_resnet50_2}


def load_test_set(category_dir: Path, resize: int, imagesize: int):
    img_t = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(imagesize), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    mask_t = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(imagesize), transforms.ToTensor()])
    images, masks, labels = [], [], []
    test_dir = category_dir / "test"
    for anomaly in sorted(p.name for p in test_dir.iterdir()):
        files = sorted((test_dir / anomaly).iterdir())
        mask_files = sorted((category_dir / "ground_truth" / anomaly).iterdir()) if anomaly != "good" else None
        for i, path in enumerate(files):
            images.append(img_t(Image.open(path).convert("RGB")))
            if mask_files is None:
                masks.append(torch.zeros(1, imagesize, imagesize))
            else:
                masks.append(mask_t(Image.open(mask_files[i])))
            labels.append(int(anomaly != "good"))
    return torch.stack(images), torch.stack(masks)[:, 0].numpy(), np.array(labels)


def load_train_images(category_dir: Path, resize: int, imagesize: int) -> torch.Tensor:
    img_t = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(imagesize), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    return torch.stack([img_t(Image.open(p).convert("RGB")) for p in sorted((category_dir / "train" / "good").iterdir())])


class _Stop(Exception):
    pass


def build_backbone(name: str, weights_path: Path, layers, input_shape):
    """Backbone with hooks, after the original's feature_dimensions() pass (train mode, ones image)."""
    model = CONSTRUCTORS[name](weights=None)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    outputs = {}

    def hook_for(layer):
        def hook(module, inp, out):
            outputs[layer] = out
            if layer == layers[-1]:
                raise _Stop

        return hook

    for layer in layers:
        module = model
        for part in layer.split("."):
            module = getattr(module, part)
        module.register_forward_hook(hook_for(layer))

    def run(images):
        outputs.clear()
        with torch.no_grad():
            try:
                model(images)
            except _Stop:
                pass
        return dict(outputs)

    run(torch.ones([1, *input_shape]))  # the original's feature_dimensions(), model still in train mode
    model.eval()
    return run


def embed(features_by_layer, layers, patchsize, pretrain_dim, target_dim):
    padding = int((patchsize - 1) / 2)
    unfolder = torch.nn.Unfold(kernel_size=patchsize, stride=1, padding=padding, dilation=1)
    feats, shapes = [], []
    for layer in layers:
        x = features_by_layer[layer]
        u = unfolder(x)
        n = [int((s + 2 * padding - (patchsize - 1) - 1) / 1 + 1) for s in x.shape[-2:]]
        u = u.reshape(*x.shape[:2], patchsize, patchsize, -1).permute(0, 4, 1, 2, 3)
        feats.append(u)
        shapes.append(n)
    ref = shapes[0]
    for i in range(1, len(feats)):
        f = feats[i]
        dims = shapes[i]
        f = f.reshape(f.shape[0], dims[0], dims[1], *f.shape[2:])
        f = f.permute(0, -3, -2, -1, 1, 2)
        base = f.shape
        f = f.reshape(-1, *f.shape[-2:])
        f = F.interpolate(f.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False).squeeze(1)
        f = f.reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
        f = f.reshape(len(f), -1, *f.shape[-3:])
        feats[i] = f
    feats = [x.reshape(-1, *x.shape[-3:]) for x in feats]
    pooled = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1) for x in feats]
    stacked = torch.stack(pooled, dim=1)
    out = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim)
    return out.reshape(len(out), -1), ref


def exact_distances(feats: np.ndarray, index, rows: np.ndarray) -> np.ndarray:
    """The squared distances of the rows faiss found, summed in float64 and rounded to float32: this
    transcription's one departure from the original, whose faiss distances carry the rounding of
    |x|² + |y|² - 2 x·y (tests/bounds.py's formula_bound), which depends on the CPU's BLAS kernel.
    Like this, our pipeline is compared with the original's without that blur."""
    bank = np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float64)  # (M, D)
    diff = feats.astype(np.float64)[:, None, :] - bank[np.asarray(rows)]  # (N, k, D)
    return (diff**2).sum(-1).astype(np.float32)  # (N, k)


def predict(params: dict, index_path: Path, weights_path: Path, images: torch.Tensor):
    """Raw image scores (N,) and segmentations (N, H, W) of one original-format model."""
    layers = params["layers_to_extract_from"]
    run = build_backbone(params["backbone.name"], weights_path, layers, params["input_shape"])
    index = faiss.read_index(str(index_path))
    scores, segs = [], []
    for image in images:  # batch size 1, as the original's default
        feats, ref = embed(
            run(image[None]), layers, params["patchsize"], params["pretrain_embed_dimension"], params["target_embed_dimension"]
        )
        _, rows = index.search(feats.numpy(), params["anomaly_scorer_num_nn"])
        dist = exact_distances(feats.numpy(), index, rows)
        patch = np.mean(dist, axis=-1).reshape(1, ref[0], ref[1])
        scores.append(patch.reshape(-1).max())
        up = F.interpolate(torch.from_numpy(patch)[:, None], size=params["input_shape"][-2:], mode="bilinear", align_corners=False)
        segs.append(ndimage.gaussian_filter(up[0, 0].numpy(), sigma=4))
    return np.array(scores), np.stack(segs)


def predict_folder(folder: Path, weights: dict[str, Path], images: torch.Tensor):
    n = len(list(folder.glob("*.faiss")))
    prefixes = [""] if n == 1 else [f"Ensemble-{i}-{n}_" for i in range(1, n + 1)]
    out = []
    for prefix in prefixes:
        with open(folder / f"{prefix}patchcore_params.pkl", "rb") as handle:
            params = pickle.load(handle)
        out.append(predict(params, folder / f"{prefix}nnscorer_search_index.faiss", weights[params["backbone.name"]], images))
    return out


def compute_pro(maps, gts, limit=0.3):
    """MVTec AD's compute_pro + trapezoid, transcribed."""
    structure = np.ones((3, 3), dtype=int)
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    num_ok, num_regions = 0, 0
    for i, gt in enumerate(gts):
        labeled, n = ndimage.label(gt, structure)
        num_regions += n
        ok = labeled == 0
        num_ok += ok.sum()
        fp_changes[i, ok] = 1
        for k in range(n):
            region = labeled == k + 1
            pro_changes[i, region] = 1.0 / region.sum()
    flat = maps.ravel()
    order = np.argsort(flat)[::-1]
    s = flat[order]
    fprs = np.cumsum(fp_changes.ravel()[order], dtype=np.float64) / num_ok
    pros = np.cumsum(pro_changes.ravel()[order], dtype=np.float64) / num_regions
    keep = np.append(np.diff(s) != 0, np.True_)
    x = np.concatenate(([0.0], np.clip(fprs[keep], None, 1.0), [1.0]))
    y = np.concatenate(([0.0], np.clip(pros[keep], None, 1.0), [1.0]))
    correction = 0.0
    if limit not in x:
        ins = bisect(x, limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (limit - x[ins - 1])
    mask = x <= limit
    x, y = x[mask], y[mask]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / limit


def evaluate(member_outputs, masks, labels) -> dict[str, float]:
    """The original's load_and_evaluate_patchcore metrics (plus AUPRO) from raw member outputs."""
    scores = np.array([s for s, _ in member_outputs])
    scores = (scores - scores.min(axis=-1).reshape(-1, 1)) / (scores.max(axis=-1) - scores.min(axis=-1)).reshape(-1, 1)
    scores = np.mean(scores, axis=0)
    segs = np.array([m for _, m in member_outputs])
    lo = segs.reshape(len(segs), -1).min(axis=-1).reshape(-1, 1, 1, 1)
    hi = segs.reshape(len(segs), -1).max(axis=-1).reshape(-1, 1, 1, 1)
    segs = np.mean((segs - lo) / (hi - lo), axis=0)
    gt = masks.astype(int)
    sel = [i for i in range(len(masks)) if np.sum(masks[i]) > 0]
    return {
        "instance_auroc": metrics.roc_auc_score(labels, scores),
        "full_pixel_auroc": metrics.roc_auc_score(gt.ravel(), segs.ravel()),
        "full_pro": compute_pro(segs, gt),
        "anomaly_pixel_auroc": metrics.roc_auc_score(gt[sel].ravel(), segs[sel].ravel()),
        "anomaly_pro": compute_pro(segs[sel], gt[sel]),
    }
