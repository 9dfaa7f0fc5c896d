"""The writers: segmentation images show the pixels the backbone saw, TensorBoard's run summary and
curves, and the hardest-case candidates kept while a category runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torchvision import transforms

from patchcore_lightning.callbacks import hardest_candidates
from patchcore_lightning.cli import main
from patchcore_lightning.data.mvtec import list_samples
from patchcore_lightning.reporting import read_results

from .conftest import FIXTURE, fixture_args


@pytest.mark.parametrize("members", [1, 2, 3])
@pytest.mark.parametrize("lowest", [False, True])
def test_hardest_candidates_hold_the_top_k_of_any_normalisation(members, lowest):
    g = torch.Generator().manual_seed(members)
    scores = (torch.rand(40, members, generator=g) * 10).round()  # ties included
    keep = hardest_candidates(scores, 4, lowest)
    assert keep.sum() < 40  # something is dropped
    for _ in range(200):  # any positive weights (1 / span of each member) and offsets
        weights = torch.rand(members, generator=g) + 0.01
        total = scores @ weights
        k_th = total.sort(descending=not lowest).values[3]
        inside = total >= k_th if not lowest else total <= k_th  # everything that can be among the first 4
        strictly = total > k_th if not lowest else total < k_th
        assert bool(keep[strictly].all())  # every image that must be shown is kept
        assert int((keep & inside).sum()) >= 4  # and enough of the tied ones
    dominated = ((scores[None] >= scores[:, None]).all(2) & (scores[None] > scores[:, None]).any(2)).sum(1)
    assert torch.equal(keep, dominated < 4) if not lowest else True


@pytest.fixture(scope="module")
def run(tmp_path_factory, resnet18_weights):
    out = tmp_path_factory.mktemp("callbacks")
    main(["test", *fixture_args(resnet18_weights, out, "--model.save_segmentation_images", "true")])
    return out


def test_segmentation_images_show_the_pixels_the_backbone_saw(run):
    geometry = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    samples = list_samples(FIXTURE / "data", "weave")
    for sample in samples:
        strip = np.asarray(Image.open(run / "segmentation_images" / "mvtec_weave" / f"{sample.name}.png"))
        assert strip.shape == (224 + 18, 3 * 224, 3)
        seen = np.asarray(geometry(Image.open(sample.image).convert("RGB")))
        np.testing.assert_array_equal(strip[18:, :224], seen)
        truth = np.zeros((224, 224), np.uint8) if sample.mask is None else np.asarray(geometry(Image.open(sample.mask)))
        np.testing.assert_array_equal(strip[18:, 224:448], np.repeat(truth[..., None], 3, axis=2))


def test_tensorboard_holds_the_runs_summary_and_curves(run):
    (version,) = (run / "lightning_logs").iterdir()
    events = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    rows = read_results(run / "results.csv")
    hp = [e.value for e in events.Scalars("hp_metric")]
    # TensorBoard stores scalars as float32: the csv's float64, rounded once
    assert hp == [float(np.float32(rows["mean"]["instance_auroc"]))]  # no -1 placeholder
    for name, value in rows["mean"].items():
        assert events.Scalars(f"test/mean/{name}")[-1].value == float(np.float32(value))
        assert events.Scalars(f"test/mvtec_weave/{name}")[-1].value == float(np.float32(rows["mvtec_weave"][name]))
    assert {"mvtec_weave/hardest_cases", "mvtec_weave/roc"} <= set(tags["images"])
    (pr,) = events.Tensors("mvtec_weave/pixel_pr")
    curve = tensor_util.make_ndarray(pr.tensor_proto)  # (6, T): tp, fp, tn, fn, precision, recall
    tp, fp, tn, fn = curve[:4]
    assert curve.shape[1] == 201 and len(set(tp + fn)) == 1 and len(set(fp + tn)) == 1
    geometry = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    masks = [np.asarray(geometry(Image.open(s.mask))) for s in list_samples(FIXTURE / "data", "weave") if s.mask]
    assert tp[0] == sum(int((m == 255).sum()) for m in masks)  # threshold 0: every anomalous pixel
    assert fp[0] == 8 * 224 * 224 - tp[0] and (np.diff(tp) <= 0).all() and (np.diff(fp) <= 0).all()
    hardest = events.Images("mvtec_weave/hardest_cases")[0]
    assert hardest.height == 8 * (224 + 18)  # 4 normal and 4 anomalous images


def test_tensorboard_converts_only_the_candidates(tmp_path, monkeypatch):
    """Per batch the callback converts (``to_display``) exactly the batch's images that are still
    candidates afterwards (the oracle: ``hardest_candidates`` of each kind over every score seen so
    far), never a whole batch; at the end it holds the candidates' pixels."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger

    from patchcore_lightning import callbacks
    from patchcore_lightning.data.images import to_display

    converted = []
    monkeypatch.setattr(callbacks, "to_display", lambda x: converted.append(len(x)) or to_display(x))
    trainer = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path)])
    report = callbacks.TensorBoardReport(per_kind=4)
    report.on_test_epoch_start(trainer, None)
    g = torch.Generator().manual_seed(0)
    N, B, M = 96, 16, 2
    images = torch.randn(N, 3, 8, 8, generator=g)  # (N, 3, S, S), normalised-like
    scores = (torch.rand(N, M, generator=g) * 20).round()  # ties included
    labels = (torch.rand(N, generator=g) < 0.4).long()
    for start in range(0, N, B):
        rows = slice(start, start + B)
        indices = torch.arange(start, start + B)
        outputs = {"raw_scores": scores[rows], "labels": labels[rows], "indices": indices}
        report.on_test_batch_end(trainer, None, outputs, (images[rows], None, labels[rows], indices), start // B)
        seen = torch.arange(start + B)
        candidates = set()
        for label in (0, 1):
            kind = seen[labels[: start + B] == label]
            keep = hardest_candidates(scores[kind], 4, lowest=label == 1)
            candidates |= set(kind[keep].tolist())
        assert converted.pop() == len(candidates & set(indices.tolist())) < B
    assert not converted  # one conversion per batch
    held_scores, held_labels, held_indices, held_images = report._held
    assert set(held_indices.tolist()) == candidates and len(candidates) < N // 2
    torch.testing.assert_close(held_images, to_display(images[held_indices]), rtol=0, atol=0)
    torch.testing.assert_close(held_scores, scores[held_indices], rtol=0, atol=0)
    assert torch.equal(held_labels, labels[held_indices])
