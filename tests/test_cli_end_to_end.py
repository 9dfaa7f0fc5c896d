"""`lightning_cli.py test` end to end on original-format folders, against the transcribed original."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from patchcore_lightning.cli import main
from patchcore_lightning.reporting import RESULTS_COLUMNS, read_results

from . import original_oracle as oracle
from .bounds import EMBED_ROUNDING, metric_shift_bounds
from .conftest import original_params, write_original_model

pytestmark = pytest.mark.kernels  # repeated by .ci/run under other CPU kernels

RESIZE, IMAGESIZE = 72, 64
ROOT = Path(__file__).parent.parent


def _bank(params: dict, weights: Path, category_dir: Path) -> np.ndarray:
    """Every second training patch feature, computed the original's way."""
    run = oracle.build_backbone("resnet18", weights, params["layers_to_extract_from"], params["input_shape"])
    feats, _ = oracle.embed(
        run(oracle.load_train_images(category_dir, RESIZE, IMAGESIZE)),
        params["layers_to_extract_from"],
        params["patchsize"],
        params["pretrain_embed_dimension"],
        params["target_embed_dimension"],
    )
    return feats.numpy()[::2]


@pytest.fixture(scope="module")
def models(tmp_path_factory, mvtec_root, resnet18_weights):
    """alpha: a single model; beta: a 2-member ensemble (other layers, dims, 3 neighbours)."""
    out = tmp_path_factory.mktemp("models")
    single = original_params(imagesize=IMAGESIZE)
    second = original_params(layers=("layer1", "layer2"), imagesize=IMAGESIZE, pretrain=80, target=48, num_nn=3)
    alpha = write_original_model(out / "mvtec_alpha", [(single, _bank(single, resnet18_weights, mvtec_root / "alpha"))])
    beta = write_original_model(
        out / "mvtec_beta",
        [(p, _bank(p, resnet18_weights, mvtec_root / "beta")) for p in (single, second)],
    )
    return {"alpha": alpha, "beta": beta}


def _expected(category_dir: Path, folder: Path, weights: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The original's metrics, and how far ours may be from them: both run the backbone on one image at
    a time (_cli_args), the same kernels; the patch aggregation sums in other orders (EMBED_ROUNDING),
    carried to the metrics by bounds.metric_shift_bounds from the original's raw outputs."""
    images, masks, labels = oracle.load_test_set(category_dir, RESIZE, IMAGESIZE)
    members = oracle.predict_folder(folder, {"resnet18": weights}, images)
    indexes = [faiss.read_index(str(p)) for p in sorted(folder.glob("*.faiss"))]  # the members' order
    norms = [np.linalg.norm(index.reconstruct_n(0, index.ntotal), axis=1).max() for index in indexes]
    subset = masks.reshape(len(masks), -1).sum(1) > 0
    bounds = metric_shift_bounds(members, norms, masks.astype(int) == 1, labels, subset, EMBED_ROUNDING)
    return oracle.evaluate(members, masks, labels), bounds


def _cli_args(mvtec_root, paths, weights, results_dir, *extra) -> list[str]:
    return [
        "test",
        "--data.root", str(mvtec_root),
        "--data.categories", "[alpha,beta]",
        "--data.resize", str(RESIZE),
        "--data.imagesize", str(IMAGESIZE),
        "--data.batch_size", "1",  # as the original: the same convolution kernels, so the same layer outputs
        "--data.num_workers", "0",
        "--model.model_paths", "[" + ",".join(str(p) for p in paths) + "]",
        "--model.backbone_weights", weights,
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--results_dir", str(results_dir),
        *extra,
    ]


def test_single_and_ensemble_folders_match_the_original(models, mvtec_root, resnet18_weights, tmp_path):
    main(_cli_args(
        mvtec_root, [models["alpha"], models["beta"]], str(resnet18_weights), tmp_path,
        "--model.save_segmentation_images", "true",
    ))
    with open(tmp_path / "results.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["dataset_name", *RESULTS_COLUMNS]
    assert [row[0] for row in table[1:]] == ["mvtec_alpha", "mvtec_beta", "mean"]
    rows = read_results(tmp_path / "results.csv")
    for category in ("alpha", "beta"):
        expected, bounds = _expected(mvtec_root / category, models[category], resnet18_weights)
        for name in RESULTS_COLUMNS:
            assert abs(rows[f"mvtec_{category}"][name] - expected[name]) <= bounds[name], (category, name, bounds[name])
    for name in RESULTS_COLUMNS:  # np.mean of two float64s: (a + b) / 2, the same bits
        assert rows["mean"][name] == (rows["mvtec_alpha"][name] + rows["mvtec_beta"][name]) / 2
    # the table differs between the two models, so the ensemble really used both members
    assert rows["mvtec_alpha"] != rows["mvtec_beta"]
    images = sorted(p.name for p in (tmp_path / "segmentation_images" / "mvtec_beta").iterdir())
    assert images == [
        "crack_000.png", "crack_001.png", "good_000.png", "good_001.png", "good_002.png", "stain_000.png", "stain_001.png"
    ]


def test_one_model_path_serves_every_category_and_weights_mapping(models, mvtec_root, resnet18_weights, tmp_path):
    main(_cli_args(mvtec_root, [models["alpha"]], f"{{resnet18: {resnet18_weights}}}", tmp_path))
    rows = read_results(tmp_path / "results.csv")
    expected, bounds = _expected(mvtec_root / "beta", models["alpha"], resnet18_weights)
    for name in ("instance_auroc", "full_pro"):
        assert abs(rows["mvtec_beta"][name] - expected[name]) <= bounds[name], (name, bounds[name])


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "lightning_cli.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_model_path_count_mismatch_is_one_clear_line(models, mvtec_root, resnet18_weights, tmp_path):
    paths = [models["alpha"], models["beta"], models["alpha"]]
    proc = _run_cli(*_cli_args(mvtec_root, paths, str(resnet18_weights), tmp_path)[0:])
    assert proc.returncode == 2
    assert "model.model_paths has 3 entries for 2 categories" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results.csv").exists()


def test_print_config_and_configs_parse():
    for config in ("mvtec_wr50_224", "mvtec_wr50_320", "mvtec_ensemble_320"):
        proc = _run_cli("test", "--config", f"configs/{config}.yaml", "--print_config")
        assert proc.returncode == 0, proc.stderr
        for key in ("results_dir:", "model_paths:", "backbone_weights:", "knn_backend:", "save_segmentation_images:",
                    "resize:", "imagesize:", "batch_size:", "num_workers:", "categories:"):
            assert key in proc.stdout, (config, key)
        assert proc.stdout.count("models/mvtec_") == 15
        assert "- zipper" in proc.stdout and "- bottle" in proc.stdout
