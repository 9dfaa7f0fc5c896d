"""VisA, MVTec AD 2, MPDD, BTAD and your own folders read in their own layouts: each gives its MVTec
AD-layout twin's results (same pixels, same model), under its own row names; bad input is one line."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_lightning.cli import main
from patchcore_lightning.data.datamodule import AnomalyDataModule
from patchcore_lightning.data.images import DataError
from patchcore_lightning.data.visa import list_samples as visa_samples
from patchcore_lightning.reporting import RESULTS_COLUMNS, read_results, read_thresholds

from .conftest import make_mvtec_tree

RESIZE, IMAGESIZE = 72, 64


def _tree(root: Path) -> Path:
    return make_mvtec_tree(root, categories=("alpha",), size=80, n_train=3, n_good=3, n_per_defect=2)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def to_btad(src: Path, dst: Path) -> None:
    """train/ok, test/{ok,ko}, ground_truth/ko/<stem>.png; the anomalous images as BMP."""
    c, d = src / "alpha", dst / "alpha"
    for split in ("train", "test"):
        for image in _images(c / split / "good"):
            (d / split / "ok").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, d / split / "ok" / image.name)
    (d / "test" / "ko").mkdir(parents=True)
    (d / "ground_truth" / "ko").mkdir(parents=True)
    for defect in ("crack", "stain"):
        for image in _images(c / "test" / defect):
            Image.open(image).save(d / "test" / "ko" / f"{defect}_{image.stem}.bmp")
            shutil.copy(c / "ground_truth" / defect / f"{image.stem}_mask.png", d / "ground_truth" / "ko" / f"{defect}_{image.stem}.png")


def to_mvtec_ad2(src: Path, dst: Path) -> None:
    """train/good, validation/good, test_public/{good,bad}, test_public/ground_truth/bad/<stem>_mask.png."""
    c, d = src / "alpha", dst / "alpha"
    shutil.copytree(c / "train" / "good", d / "train" / "good")
    shutil.copytree(c / "train" / "good", d / "validation" / "good")
    shutil.copytree(c / "test" / "good", d / "test_public" / "good")
    (d / "test_public" / "bad").mkdir(parents=True)
    (d / "test_public" / "ground_truth" / "bad").mkdir(parents=True)
    for defect in ("crack", "stain"):
        for image in _images(c / "test" / defect):
            shutil.copy(image, d / "test_public" / "bad" / f"{defect}_{image.name}")
            shutil.copy(c / "ground_truth" / defect / f"{image.stem}_mask.png",
                        d / "test_public" / "ground_truth" / "bad" / f"{defect}_{image.stem}_mask.png")


def to_visa(src: Path, dst: Path, twin: Path) -> None:
    """VisA's layout with JPEG images and masks marking defects by small values; ``twin`` gets the
    MVTec-layout copy of the very pixels the JPEGs decode to, with 0/255 masks."""
    c = src / "alpha"
    rows = [["object", "split", "label", "image", "mask"]]
    for split, kind, folder in (("train", "normal", c / "train" / "good"), ("test", "normal", c / "test" / "good"),
                                *(("test", "anomaly", c / "test" / d) for d in ("crack", "stain"))):
        for image in _images(folder):
            name = f"{split}_{folder.name}_{image.stem}"
            rel = Path("alpha") / "Data" / "Images" / ("Normal" if kind == "normal" else "Anomaly") / f"{name}.JPG"
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.open(image).convert("RGB").save(dst / rel, format="JPEG", quality=90)
            decoded = Image.open(dst / rel).convert("RGB")  # what the reader sees
            twin_type = "good" if kind == "normal" else folder.name
            twin_image = twin / "alpha" / split / twin_type / f"{name}.png"
            twin_image.parent.mkdir(parents=True, exist_ok=True)
            decoded.save(twin_image)
            mask_rel = ""
            if kind == "anomaly":
                mask = np.asarray(Image.open(c / "ground_truth" / folder.name / f"{image.stem}_mask.png")) > 0
                mask_rel = (Path("alpha") / "Data" / "Masks" / "Anomaly" / f"{name}.png").as_posix()
                (dst / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * (1 if folder.name == "crack" else 7)).save(dst / mask_rel)
                twin_mask = twin / "alpha" / "ground_truth" / folder.name / f"{name}_mask.png"
                twin_mask.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(twin_mask)
            rows.append(["alpha", split, kind, rel.as_posix(), mask_rel])
    (dst / "split_csv").mkdir(parents=True)
    with open(dst / "split_csv" / "1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _run(root: Path, benchmark: str, model: Path, weights: Path, out: Path, command: str = "test") -> dict:
    main([
        command,
        "--data.root", str(root),
        "--data.benchmark", benchmark,
        "--data.categories", "[alpha]",
        "--data.resize", str(RESIZE),
        "--data.imagesize", str(IMAGESIZE),
        "--data.num_workers", "0",
        "--data.batch_size", "1",  # each image alone, whatever the layout's order: the same kernels, the same bits
        "--model.model_paths", f"[{model}]",
        "--model.backbone_weights", str(weights),
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--results_dir", str(out),
    ])
    return read_results(out / "results.csv"), read_thresholds(out / "thresholds.csv")


@pytest.fixture(scope="module")
def twin(tmp_path_factory, resnet18_weights):
    """The MVTec-layout category, its model (fit on it) and its results."""
    base = tmp_path_factory.mktemp("layouts")
    root = _tree(base / "mvtec")
    main(["fit", "--data.root", str(root), "--data.categories", "[alpha]", "--data.resize", str(RESIZE),
          "--data.imagesize", str(IMAGESIZE), "--data.num_workers", "0", "--model.backbones", "[resnet18]",
          "--model.backbone_weights", str(resnet18_weights), "--model.pretrain_embed_dimension", "96",
          "--model.target_embed_dimension", "64", "--model.percentage", "0.5", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--results_dir", str(base / "fit")])
    model = base / "fit" / "models" / "mvtec_alpha"
    return base, root, model, _run(root, "mvtec_ad", model, resnet18_weights, base / "twin")


def _same(ours: tuple, theirs: tuple, name: str) -> None:
    (rows, thresholds), (twin_rows, twin_thresholds) = ours, theirs
    assert list(rows) == [name, "mean"] and list(thresholds) == [name]
    for column in RESULTS_COLUMNS:
        # the same images, each in a batch of one (_run), one process: the same kernels, the same bits
        assert rows[name][column] == twin_rows["mvtec_alpha"][column], column
    for column, value in twin_thresholds["mvtec_alpha"].items():
        assert thresholds[name][column] == value, column


@pytest.mark.parametrize("benchmark, convert", [("mpdd", shutil.copytree), ("btad", to_btad), ("mvtec_ad2", to_mvtec_ad2)])
def test_layouts_of_mvtecs_shape_give_the_twins_results(twin, resnet18_weights, tmp_path, benchmark, convert):
    base, root, model, expected = twin
    convert(root, tmp_path / benchmark)
    _same(_run(tmp_path / benchmark, benchmark, model, resnet18_weights, tmp_path / "out"), expected, f"{benchmark}_alpha")


def test_visa_gives_its_twins_results(twin, resnet18_weights, tmp_path):
    _, root, model, _ = twin
    to_visa(root, tmp_path / "visa", tmp_path / "visa_twin")
    expected = _run(tmp_path / "visa_twin", "mvtec_ad", model, resnet18_weights, tmp_path / "twin_out")
    _same(_run(tmp_path / "visa", "visa", model, resnet18_weights, tmp_path / "out"), expected, "visa_alpha")
    samples = visa_samples(tmp_path / "visa", "alpha")
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1, 1] and samples[-1].mask.suffix == ".png"
    assert len(visa_samples(tmp_path / "visa", "alpha", "train")) == 3


def test_folder_without_masks_gives_the_image_metrics_and_nan_pixel_columns(twin, resnet18_weights, tmp_path, caplog):
    _, root, model, (twin_rows, twin_thresholds) = twin
    shutil.copytree(root, tmp_path / "own")
    shutil.rmtree(tmp_path / "own" / "alpha" / "ground_truth")
    caplog.clear()
    rows, thresholds = _run(tmp_path / "own", "folder", model, resnet18_weights, tmp_path / "out")
    row = rows["folder_alpha"]
    assert row["instance_auroc"] == twin_rows["mvtec_alpha"]["instance_auroc"]  # batches of one: same bits
    assert all(math.isnan(row[c]) for c in RESULTS_COLUMNS[1:])
    assert thresholds["folder_alpha"]["image_f1"] == twin_thresholds["mvtec_alpha"]["image_f1"]
    assert math.isnan(thresholds["folder_alpha"]["pixel_threshold"]) and math.isnan(thresholds["folder_alpha"]["pixel_f1"])
    assert caplog.text.count("no anomalous test image has a ground-truth mask") == 1
    # the same folder with its masks is MVTec AD's layout
    _same(_run(root, "folder", model, resnet18_weights, tmp_path / "with_masks"), (twin_rows, twin_thresholds), "folder_alpha")


def test_fit_needs_only_train_good(tmp_path, resnet18_weights):
    root = _tree(tmp_path / "data")
    shutil.rmtree(root / "alpha" / "test")
    shutil.rmtree(root / "alpha" / "ground_truth")
    main(["fit", "--data.root", str(root), "--data.benchmark", "folder", "--data.categories", "[alpha]",
          "--data.resize", str(RESIZE), "--data.imagesize", str(IMAGESIZE), "--data.num_workers", "0",
          "--model.backbones", "[resnet18]", "--model.backbone_weights", str(resnet18_weights),
          "--model.pretrain_embed_dimension", "96", "--model.target_embed_dimension", "64",
          "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--results_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "models" / "folder_alpha" / "nnscorer_search_index.faiss").is_file()


def _fails(capsys, args: list[str], expected: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and "Traceback" not in err, err
    return err


def test_bad_input_in_each_layout_is_one_line_naming_the_file(twin, resnet18_weights, tmp_path, capsys):
    _, root, model, _ = twin

    def args(data: Path, benchmark: str) -> list[str]:
        return ["test", "--data.root", str(data), "--data.benchmark", benchmark, "--data.categories", "[alpha]",
                "--data.resize", str(RESIZE), "--data.imagesize", str(IMAGESIZE), "--data.num_workers", "0",
                "--model.model_paths", f"[{model}]", "--model.backbone_weights", str(resnet18_weights),
                "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--results_dir", str(tmp_path / "out")]

    to_visa(root, tmp_path / "visa", tmp_path / "visa_twin")
    split_file = tmp_path / "visa" / "split_csv" / "1cls.csv"
    number, missing = next((n, line.split(",")[3]) for n, line in enumerate(split_file.read_text().splitlines(), 1)
                           if ",test,anomaly," in line)
    (tmp_path / "visa" / missing).unlink()
    _fails(capsys, args(tmp_path / "visa", "visa"), f"1cls.csv line {number} names a missing image: {tmp_path / 'visa' / missing}")
    split_file.unlink()
    _fails(capsys, args(tmp_path / "visa", "visa"), f"no VisA split file {split_file}")

    to_btad(root, tmp_path / "btad")
    mask = tmp_path / "btad" / "alpha" / "ground_truth" / "ko" / "crack_000.png"
    mask.unlink()
    _fails(capsys, args(tmp_path / "btad", "btad"), "no ground-truth mask for test/ko/crack_000.bmp (looked for crack_000.* in")
    Image.new("L", (10, 10)).save(mask)
    _fails(capsys, args(tmp_path / "btad", "btad"), "crack_000.png is 10x10, its image")

    shutil.copytree(root, tmp_path / "own")
    (tmp_path / "own" / "alpha" / "ground_truth" / "crack" / "000_mask.png").unlink()
    err = _fails(capsys, args(tmp_path / "own", "folder"), "no ground-truth mask for test/crack/000.png")
    assert "other anomalous images have masks: give all of them masks, or none" in err

    to_mvtec_ad2(root, tmp_path / "ad2")
    shutil.rmtree(tmp_path / "ad2" / "alpha" / "test_public")
    _fails(capsys, args(tmp_path / "ad2", "mvtec_ad2"), "no test_public/ folder in")
    _fails(capsys, args(root, "visaa"), "visaa")


def test_dataset_names_follow_the_benchmark():
    names = {b: AnomalyDataModule(categories=["x"], benchmark=b).dataset_name for b in
             ("mvtec_ad", "mvtec_ad2", "visa", "mpdd", "btad", "folder")}
    assert names == {"mvtec_ad": "mvtec_x", "mvtec_ad2": "mvtec_ad2_x", "visa": "visa_x", "mpdd": "mpdd_x",
                     "btad": "btad_x", "folder": "folder_x"}
    with pytest.raises(DataError, match="unknown benchmark 'nope'"):
        from patchcore_lightning.data.datamodule import list_split

        list_split("nope", ".", "x", "test")


@pytest.mark.parametrize(
    "config, benchmark, categories",
    [("visa_wr50_224", "visa", 12), ("mvtec_ad2_wr50_224", "mvtec_ad2", 8), ("mpdd_wr50_224", "mpdd", 6),
     ("btad_wr50_224", "btad", 3)],
)
def test_benchmark_configs_parse(config, benchmark, categories):
    from patchcore_lightning.cli import PatchCoreCLI

    root = Path(__file__).parent.parent
    cli = PatchCoreCLI(args=["--config", str(root / "configs" / f"{config}.yaml")], run=False)
    dm = cli.datamodule
    assert dm.hparams.benchmark == benchmark and len(dm.categories) == categories
    assert all(isinstance(c, str) for c in dm.categories) and cli.model.hparams.model_paths is None
    assert dm.dataset_name.startswith(f"{'mvtec' if benchmark == 'mvtec_ad' else benchmark}_")
