"""Outputs others can read: the mode a plain open() gives, symlinked folders of predict_dir followed
(loops listed in skipped.csv, not followed), the mean row over the categories that have each number."""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_lightning.cli import main
from patchcore_lightning.data.folder import ImageFolderDataset
from patchcore_lightning.data.images import DataError
from patchcore_lightning.reporting import (
    RESULTS_COLUMNS,
    mean_row,
    read_results,
    write_predictions,
    write_results,
    write_run_state,
)

from .conftest import FIXTURE, make_mvtec_tree

ROW = {"instance_auroc": 0.75, "full_pixel_auroc": 0.5, "full_pro": 0.25, "anomaly_pixel_auroc": 0.625,
       "anomaly_pro": 0.125, "image_threshold": 1.5, "image_f1": 0.8, "pixel_threshold": 2.5, "pixel_f1": 0.4}


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_mode_a_plain_open_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:  # the oracle
            handle.write("x")
        expected = _mode(tmp_path / "plain.txt")
        out = tmp_path / "results"
        write_run_state(out, {"mvtec_a": ROW}, {"mvtec_a": "0" * 64})
        write_predictions(out, [{"path": "a.png", "score": 1.0, "scores": [1.0]}, {"path": "b.png", "error": "OSError: x"}],
                          None, None, 1)
        names = ("results.csv", "thresholds.csv", "results_config.json", "predictions.csv", "skipped.csv")
        assert {name: _mode(out / name) for name in names} == dict.fromkeys(names, expected)
        # a file that exists keeps its mode when rewritten, as with open(path, "w")
        os.chmod(out / "results.csv", 0o640)
        write_results(out / "results.csv", {"mvtec_a": ROW, "mvtec_b": ROW})
        assert _mode(out / "results.csv") == 0o640 and list(read_results(out / "results.csv")) == ["mvtec_a", "mvtec_b", "mean"]
        assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary file left
    finally:
        os.umask(previous)
    assert expected == 0o666 & ~umask


def test_the_mean_row_averages_each_column_over_the_categories_that_have_it():
    without_masks = {**ROW, "instance_auroc": 0.5, **dict.fromkeys(RESULTS_COLUMNS[1:], math.nan)}
    rows = {"folder_a": ROW, "folder_b": without_masks, "folder_c": {**ROW, "instance_auroc": 1.0, "full_pro": 0.75}}
    mean = mean_row(rows)
    assert mean["instance_auroc"] == (0.75 + 0.5 + 1.0) / 3  # every category
    assert mean["full_pro"] == (0.25 + 0.75) / 2  # the categories with masks
    assert mean["anomaly_pro"] == 0.125
    nan_only = mean_row({"folder_b": without_masks})
    assert nan_only["instance_auroc"] == 0.5 and all(math.isnan(nan_only[c]) for c in RESULTS_COLUMNS[1:])


def test_mean_row_of_a_run_where_one_category_has_no_masks(tmp_path, resnet18_weights):
    root = make_mvtec_tree(tmp_path / "data", categories=("alpha", "beta"), size=64, n_train=3, n_good=2, n_per_defect=1)
    shutil.rmtree(root / "beta" / "ground_truth")
    main(["test", "--data.root", str(root), "--data.benchmark", "folder", "--data.categories", "[alpha,beta]",
          "--data.resize", "64", "--data.imagesize", "64", "--data.num_workers", "0", "--model.backbones", "[resnet18]",
          "--model.backbone_weights", str(resnet18_weights), "--model.pretrain_embed_dimension", "64",
          "--model.target_embed_dimension", "32", "--model.sampler", "identity", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--results_dir", str(tmp_path / "out")])
    rows = read_results(tmp_path / "out" / "results.csv")
    alpha, beta, mean = rows["folder_alpha"], rows["folder_beta"], rows["mean"]
    assert all(math.isnan(beta[c]) for c in RESULTS_COLUMNS[1:]) and not any(math.isnan(alpha[c]) for c in RESULTS_COLUMNS)
    assert mean["instance_auroc"] == float(np.mean([alpha["instance_auroc"], beta["instance_auroc"]]))
    assert {c: mean[c] for c in RESULTS_COLUMNS[1:]} == {c: alpha[c] for c in RESULTS_COLUMNS[1:]}


def _predict_tree(tmp_path: Path) -> Path:
    """root/day1/<image>, root/cam -> ../elsewhere (a folder outside root), root/day1/back -> root
    and root/self -> . (loops), root/gone.png -> a missing file."""
    source = sorted((FIXTURE / "data" / "weave" / "test").rglob("*.png"))
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "day1").mkdir(parents=True)
    (elsewhere / "sub").mkdir(parents=True)
    shutil.copy(source[0], root / "day1" / "a.png")
    shutil.copy(source[1], elsewhere / "b.png")
    shutil.copy(source[2], elsewhere / "sub" / "c.png")
    os.symlink(elsewhere, root / "cam", target_is_directory=True)
    os.symlink(root, root / "day1" / "back", target_is_directory=True)
    os.symlink(".", root / "self", target_is_directory=True)
    os.symlink(tmp_path / "missing.png", root / "gone.png")
    return root


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="symlinks")
def test_symlinked_folders_are_followed_and_loops_listed(tmp_path, resnet18_weights):
    root = _predict_tree(tmp_path)
    dataset = ImageFolderDataset(root, 32, 32)
    listed = [dataset.relative(i) for i in range(len(dataset))]
    assert listed == ["cam/b.png", "cam/sub/c.png", "day1/a.png", "day1/back", "gone.png", "self"]
    reasons = {dataset.relative(i): dataset[i][2] for i in range(len(dataset))}
    assert reasons["day1/back"] == f"symlink loop: leads to {os.path.realpath(root)}, a folder it is in; not followed"
    assert reasons["self"] == reasons["day1/back"]
    assert reasons["gone.png"] == f"broken symlink: {tmp_path / 'missing.png'} does not exist"
    assert reasons["cam/b.png"] == reasons["cam/sub/c.png"] == reasons["day1/a.png"] == ""

    main(["predict", "--data.predict_dir", str(root), "--data.num_workers", "0", "--data.batch_size", "2",
          "--model.model_paths", f"[{FIXTURE / 'model'}]", "--model.backbone_weights", str(resnet18_weights),
          "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--results_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        assert [r["path"] for r in csv.DictReader(handle)] == ["cam/b.png", "cam/sub/c.png", "day1/a.png"]
    with open(tmp_path / "out" / "skipped.csv", newline="") as handle:
        skipped = {r["path"]: r["reason"] for r in csv.DictReader(handle)}
    assert skipped == {name: reasons[name] for name in ("day1/back", "gone.png", "self")}


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="symlinks")
def test_a_folder_of_loops_only_is_a_clear_error(tmp_path):
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "root", tmp_path / "root" / "again", target_is_directory=True)
    Image.new("L", (4, 4)).save(tmp_path / "root" / "notes.txt", format="png")  # not an image's name
    with pytest.raises(DataError, match=r"no images under .*root \(looked for .*recursively; not read: again\)"):
        ImageFolderDataset(tmp_path / "root", 32, 32)
