"""predict on a folder: nested, mixed formats, unreadable files listed, scores equal test's raw scores."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from patchcore_lightning.cli import PatchCoreCLI, main
from patchcore_lightning.data.mvtec import list_samples

from .conftest import FIXTURE


def _common(weights, results_dir) -> list[str]:
    return [
        "--data.num_workers", "0",
        "--data.batch_size", "1",  # each image alone in test, predict and each rank: the same kernels, the same bits
        "--model.model_paths", f"[{FIXTURE / 'model'}]",
        "--model.backbone_weights", str(weights),
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--results_dir", str(results_dir),
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The fixture's 8 test images in nested folders, as png / PNG / bmp / tif / RGBA png, plus extras."""
    root = tmp_path_factory.mktemp("line3")
    samples = list_samples(FIXTURE / "data", "weave")
    formats = ["png", "PNG", "bmp", "tif", "rgba", "tiff", "png", "bmp"]
    truth = {}
    for i, (sample, fmt) in enumerate(zip(samples, formats)):
        image = Image.open(sample.image).convert("RGB")
        sub = root / ("day1" if i % 2 else "day2/cam0") / sample.anomaly
        sub.mkdir(parents=True, exist_ok=True)
        if fmt == "rgba":
            path = sub / f"{sample.image.stem}.png"
            image.convert("RGBA").save(path)
        else:
            path = sub / f"{sample.image.stem}.{fmt}"
            image.save(path, format={"PNG": "png", "tif": "tiff"}.get(fmt, fmt))
        truth[path.relative_to(root).as_posix()] = (sample, sample.label)
    Image.open(samples[0].image).convert("L").save(root / "day1" / "gray.jpg")  # read, not compared
    (root / "day1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "notes.txt").write_text("not an image")
    return root, truth


def test_predict_scores_equal_test_raw_scores(folder, resnet18_weights, tmp_path):
    root, truth = folder
    main(["predict", *_common(resnet18_weights, tmp_path / "pred"), "--data.predict_dir", str(root),
          "--model.image_threshold", "20", "--model.save_raw_maps", "true"])
    with open(tmp_path / "pred" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths) and len(paths) == 9  # 8 test images + gray.jpg; broken.png skipped
    assert "day1/gray.jpg" in paths and "notes.txt" not in paths
    with open(tmp_path / "pred" / "skipped.csv", newline="") as handle:
        skipped = list(csv.DictReader(handle))
    assert [s["path"] for s in skipped] == ["day1/broken.png"] and skipped[0]["reason"]

    cli = PatchCoreCLI(args=["test", *_common(resnet18_weights, tmp_path / "test"), "--data.root", str(FIXTURE / "data"),
                             "--data.categories", "[weave]"])
    result = cli.evaluation
    samples = cli.datamodule.test_dataset.samples
    raw = {samples[int(i)].image: float(s) for i, s in zip(result.indices, result.raw_scores[:, 0])}
    scores = {r["path"]: float(r["score"]) for r in rows}
    for path, (sample, _) in truth.items():
        assert scores[path] == raw[sample.image], path  # batches of one (_common): the same bits
    for r in rows:
        assert int(r["is_anomalous"]) == int(float(r["score"]) >= 20)
    # ranking the folder's images by score reproduces the test set's instance AUROC
    labels = [truth[p][1] for p in truth]
    auroc = roc_auc_score(labels, [scores[p] for p in truth])
    assert auroc == result.instance_auroc == 0.8125  # the same scores; 13 of 16 pairs, exact in float64
    heatmap = tmp_path / "pred" / "heatmaps" / "day2" / "cam0" / "good" / "000.png.png"
    assert Image.open(heatmap).size == (2 * 224, 224 + 18)
    assert np.load(heatmap.with_suffix(".npy")).shape == (224, 224)


def test_predict_empty_folder_is_a_clear_error(tmp_path, resnet18_weights, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *_common(resnet18_weights, tmp_path / "out"), "--data.predict_dir", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "no images under" in capsys.readouterr().err


def test_predict_under_ddp_scores_each_image_once(folder, resnet18_weights, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _ = folder
    script = Path(__file__).parent.parent / "lightning_cli.py"

    def run(out, *extra):
        args = [sys.executable, str(script), "predict", *_common(resnet18_weights, out), "--data.predict_dir", str(root), *extra]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # equal thread counts: the same kernels
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out / "predictions.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    one = run(tmp_path / "one")
    two = run(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert [r["path"] for r in two] == [r["path"] for r in one]  # each once, same order
    for a, b in zip(one, two):
        assert float(b["score"]) == float(a["score"]), a["path"]  # batches of one (_common): the same bits
    assert (tmp_path / "two" / "skipped.csv").read_text() == (tmp_path / "one" / "skipped.csv").read_text()
