"""F1-max thresholds: the pure function against sklearn, thresholds.csv against sklearn on the raw
outputs, and predict with those thresholds flagging exactly the images and pixels they promise."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import precision_recall_curve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from patchcore_lightning.cli import PatchCoreCLI, main
from patchcore_lightning.data.mvtec import MVTecDataset, list_samples
from patchcore_lightning.metrics import f1_max
from patchcore_lightning.model import Backbones, PatchCore
from patchcore_lightning.reporting import read_thresholds

from .bounds import F1_BOUND
from .conftest import FIXTURE, fixture_args


def _sklearn_f1_max(scores: np.ndarray, targets: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(targets.ravel(), scores.ravel())
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def _f1_at(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    predicted = scores >= threshold
    tp = int((predicted & targets).sum())
    return 2 * tp / (predicted.sum() + targets.sum())


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, 1), (2, 2), (3, 0)])
def test_f1_max_is_sklearns_and_its_threshold_gives_it(seed, decimals):
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(500, generator=g) < 0.2
    scores = torch.randn(500, generator=g) + 1.5 * targets
    if decimals is not None:
        scores = scores.round(decimals=decimals)  # ties, across the classes too
    threshold, f1 = f1_max(scores, targets)
    assert f1 == pytest.approx(_sklearn_f1_max(scores.numpy(), targets.numpy()), abs=F1_BOUND)
    assert _f1_at(scores.numpy(), targets.numpy(), threshold) == f1  # one division of the same counts
    assert threshold in scores[targets].tolist()  # one of the positives' scores
    higher = scores[targets][scores[targets] > threshold]
    assert all(_f1_at(scores.numpy(), targets.numpy(), float(t)) < f1 for t in higher.unique())  # the highest of ties


def test_f1_max_without_positives_is_nan():
    assert all(math.isnan(x) for x in f1_max(torch.rand(10), torch.zeros(10, dtype=torch.bool)))
    threshold, f1 = f1_max(torch.tensor([0.2, 0.7]), torch.tensor([True, True]))  # no negatives: all flagged
    assert (threshold, f1) == (float(torch.tensor(0.2)), 1.0)  # the positive's float32 score


@pytest.fixture(scope="module")
def tested(tmp_path_factory, resnet18_weights):
    out = tmp_path_factory.mktemp("thresholds")
    cli = PatchCoreCLI(args=["test", *fixture_args(resnet18_weights, out)])
    return out, cli.evaluation


def test_thresholds_csv_holds_sklearns_f1_max_on_the_raw_outputs(tested, resnet18_weights):
    out, result = tested
    with open(out / "thresholds.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["dataset_name", "image_threshold", "image_f1", "pixel_threshold", "pixel_f1"]
    row = read_thresholds(out / "thresholds.csv")["mvtec_weave"]
    labels = result.labels.numpy() == 1
    scores = result.raw_scores.mean(dim=1).numpy()  # the raw image score predict reports
    assert row["image_f1"] == pytest.approx(_sklearn_f1_max(scores, labels), abs=F1_BOUND)
    assert _f1_at(scores, labels, row["image_threshold"]) == row["image_f1"]  # one division of the same counts
    # the raw segmentations, computed again the way the CLI computes them (same batches)
    dataset = MVTecDataset(list_samples(FIXTURE / "data", "weave"), 256, 224)
    model = PatchCore.from_folder(FIXTURE / "model", 224, Backbones(str(resnet18_weights)))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        maps = torch.cat([model(batch)[1].mean(dim=1) for batch in images.split(3)]).numpy()
    truth = result.masks.numpy() == 255
    assert row["pixel_f1"] == pytest.approx(_sklearn_f1_max(maps, truth), abs=F1_BOUND)
    assert _f1_at(maps, truth, row["pixel_threshold"]) == row["pixel_f1"]  # one division of the same counts
    events = EventAccumulator(str(next((out / "lightning_logs").iterdir())), size_guidance={"scalars": 0})
    events.Reload()
    for name, value in row.items():
        assert events.Scalars(f"test/mvtec_weave/{name}")[-1].value == float(np.float32(value))  # stored as float32


def test_predict_with_the_thresholds_flags_what_they_promise(tested, resnet18_weights, tmp_path):
    out, result = tested
    row = read_thresholds(out / "thresholds.csv")["mvtec_weave"]
    folder = tmp_path / "images"
    labels = {}
    for sample in list_samples(FIXTURE / "data", "weave"):
        name = f"{sample.anomaly}_{sample.image.name}"
        folder.mkdir(exist_ok=True)
        shutil.copy(sample.image, folder / name)
        labels[name] = sample.label
    for how, extra in (
        ("typed", ["--model.image_threshold", repr(row["image_threshold"]), "--model.pixel_threshold", repr(row["pixel_threshold"])]),
        ("csv", ["--model.thresholds_csv", str(out / "thresholds.csv")]),
    ):
        main(["predict", *fixture_args(resnet18_weights, tmp_path / how, *extra), "--data.predict_dir", str(folder),
              "--model.save_raw_maps", "true"])
        with open(tmp_path / how / "predictions.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        flagged = np.array([int(r["is_anomalous"]) for r in rows]) == 1
        truth = np.array([labels[r["path"]] for r in rows]) == 1
        assert 2 * (flagged & truth).sum() / (flagged.sum() + truth.sum()) == row["image_f1"]  # one division of the same counts
        for r in rows:
            name = r["path"].rsplit(".", 1)[0]  # heatmaps/<path without its extension>
            raw = np.load(tmp_path / how / "heatmaps" / f"{name}.npy")
            mask = np.asarray(Image.open(tmp_path / how / "heatmaps" / f"{name}_mask.png"))
            assert int(r["anomalous_pixels"]) == int((raw >= row["pixel_threshold"]).sum()) == int((mask == 255).sum())
            assert set(np.unique(mask)) <= {0, 255}


def test_thresholds_csv_conflicts_and_missing_rows_are_clear(tested, resnet18_weights, tmp_path, capsys):
    out, _ = tested
    with pytest.raises(SystemExit):
        main(["predict", *fixture_args(resnet18_weights, tmp_path / "a", "--model.thresholds_csv", str(out / "thresholds.csv"),
                                "--model.image_threshold", "3"), "--data.predict_dir", str(FIXTURE / "data")])
    assert "give model.thresholds_csv or model.image_threshold / model.pixel_threshold, not both" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("dataset_name,image_threshold,image_f1,pixel_threshold,pixel_f1\nvisa_candle,1,1,1,1\n")
    with pytest.raises(SystemExit):
        main(["predict", *fixture_args(resnet18_weights, tmp_path / "b", "--model.thresholds_csv", str(other)),
              "--data.predict_dir", str(FIXTURE / "data")])
    assert "has no row for this model (model or mvtec_weave); it has ['visa_candle']" in capsys.readouterr().err
