"""predict on a folder: nested, mixed formats, unreadable files listed, scores equal test's raw scores."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from patchcore_lightning.callbacks import heatmap_names
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
    heatmap = tmp_path / "pred" / "heatmaps" / "day2" / "cam0" / "good" / "000.png"  # of day2/cam0/good/000.png
    assert Image.open(heatmap).size == (2 * 224, 224 + 18)
    assert np.load(heatmap.with_suffix(".npy")).shape == (224, 224)
    assert not list((tmp_path / "pred" / "heatmaps").rglob("*.png.png"))  # one extension


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
    two = run(tmp_path / "two", "--trainer.devices", "2")  # no strategy: Lightning's auto resolves to DDP
    assert [r["path"] for r in two] == [r["path"] for r in one]  # each once, same order
    assert (tmp_path / "two" / "predictions.csv").read_text() == (tmp_path / "one" / "predictions.csv").read_text()
    assert (tmp_path / "two" / "skipped.csv").read_text() == (tmp_path / "one" / "skipped.csv").read_text()
    heatmaps = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "heatmaps").rglob("*.png"))
    assert len(heatmaps) == len(one)
    for name in heatmaps:  # written by the rank that scored the image
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_heatmap_names_keep_one_extension_and_never_share_a_file():
    assert heatmap_names(["day1/000.png", "day1/001.JPG", "b.tif"]) == ["day1/000", "day1/001", "b"]
    # a.png and a.jpg of one folder (and A.bmp, one file on a case-insensitive system) keep their extensions
    names = heatmap_names(["a.png", "a.jpg", "A.bmp", "sub/a.png", "b.png"])
    assert names == ["a.png", "a.jpg", "A.bmp", "sub/a", "b"]
    with pytest.raises(ValueError, match=r"heatmaps/a_mask.png for both a.png and a_mask.png"):
        heatmap_names(["a.png", "a_mask.png"], masks=True)
    assert heatmap_names(["a.png", "a_mask.png"]) == ["a", "a_mask"]  # no masks: nothing shared
    with pytest.raises(ValueError, match=r"heatmaps/a.png.png for both a.png and a.png.bmp"):
        heatmap_names(["a.png", "a.jpg", "a.png.bmp"])


def test_heatmaps_show_the_score_and_do_not_overwrite_each_other(tmp_path, resnet18_weights, monkeypatch):
    """a.png and a.jpg of one folder get a heatmap each; every file is the same with 4 encoding threads
    as in the loop's thread; the right panel is the raw map over the image, captioned with the score."""
    from functools import partial

    from patchcore_lightning import callbacks, cli
    from patchcore_lightning.reporting import blend

    root = tmp_path / "in"
    samples = list_samples(FIXTURE / "data", "weave")
    (root / "cam").mkdir(parents=True)
    Image.open(samples[0].image).convert("RGB").save(root / "cam" / "a.png")
    Image.open(samples[-1].image).convert("RGB").save(root / "cam" / "a.jpg", quality=95)
    Image.open(samples[1].image).convert("RGB").save(root / "cam" / "b.png")
    captions = []
    compose = callbacks.compose
    monkeypatch.setattr(callbacks, "compose", lambda panels, caption: captions.append(caption) or compose(panels, caption))
    args = ["--data.predict_dir", str(root), "--model.pixel_threshold", "3", "--model.save_raw_maps", "true"]
    main(["predict", *_common(resnet18_weights, tmp_path / "pooled"), *args])
    monkeypatch.setattr(cli, "PredictionWriter", partial(callbacks.PredictionWriter, encode_threads=0))
    main(["predict", *_common(resnet18_weights, tmp_path / "inline"), *args])

    files = sorted(p.relative_to(tmp_path / "pooled").as_posix() for p in (tmp_path / "pooled" / "heatmaps").rglob("*") if p.is_file())
    assert files == [f"heatmaps/cam/{n}{s}" for n in ("a.jpg", "a.png", "b") for s in (".npy", ".png", "_mask.png")]
    for name in files:
        assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / "pooled" / name).read_bytes(), name
    with open(tmp_path / "pooled" / "predictions.csv", newline="") as handle:
        scores = {r["path"]: float(r["score"]) for r in csv.DictReader(handle)}
    assert scores["cam/a.png"] != scores["cam/a.jpg"]
    for path, name in (("cam/a.png", "cam/a.png"), ("cam/a.jpg", "cam/a.jpg"), ("cam/b.png", "cam/b")):
        strip = np.asarray(Image.open(tmp_path / "pooled" / "heatmaps" / f"{name}.png"))  # (18 + S, 2S, 3)
        raw_map = torch.from_numpy(np.load(tmp_path / "pooled" / "heatmaps" / f"{name}.npy"))
        image, top = strip[18:, :224], float(raw_map.max())  # no threshold nor heatmap_max: the map's own maximum
        np.testing.assert_array_equal(strip[18:, 224:], blend(image, (raw_map / top).clamp(0, 1)))
        assert f"{path}  score {scores[path]:.6g}  scale 0..{top:.4g}" in captions  # the score, not the map's max
        assert f"{top:.6g}" != f"{scores[path]:.6g}"  # (the blurred map's maximum is another number)
