"""Every category of a run is checked before any work: one line lists every problem, nothing is written."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from patchcore_lightning.cli import main
from patchcore_lightning.model_io import ModelFormatError, read_index_header

from .conftest import FIXTURE, make_mvtec_tree
from .test_benchmarks import to_btad, to_visa


def _args(command: str, root: Path, benchmark: str, categories: str, results: Path, weights: Path, *extra: str) -> list[str]:
    return [
        command,
        "--data.root", str(root),
        "--data.benchmark", benchmark,
        "--data.categories", categories,
        "--data.resize", "72",
        "--data.imagesize", "64",
        "--data.num_workers", "0",
        "--model.backbones", "[resnet18]",
        "--model.backbone_weights", str(weights),
        "--model.pretrain_embed_dimension", "96",
        "--model.target_embed_dimension", "64",
        "--model.percentage", "0.5",
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--results_dir", str(results),
        *extra,
    ]


def _refused(capsys, args: list[str], results: Path) -> str:
    """The run ends in exit 2 and one line on stderr, with nothing fit, evaluated or written."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "Building memory bank" not in err and "Evaluating dataset" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert not (results / "models").exists() and not (results / "results.csv").exists()
    return errors[0]


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_typo_in_the_second_btad_category_is_found_before_the_first_is_fit(tmp_path, resnet18_weights, capsys, command):
    src = make_mvtec_tree(tmp_path / "mvtec", categories=("alpha",), size=64, n_train=2, n_good=2, n_per_defect=1)
    to_btad(src, tmp_path / "btad")
    results = tmp_path / "out"
    line = _refused(capsys, _args(command, tmp_path / "btad", "btad", '["alpha", "04"]', results, resnet18_weights), results)
    assert "1 problem(s) found before any work" in line
    assert f"[btad_04] category folder not found: {tmp_path / 'btad' / '04'} (categories in {tmp_path / 'btad'}: ['alpha'])" in line


def test_every_problem_of_every_visa_category_is_in_the_one_line(tmp_path, resnet18_weights, capsys):
    src = make_mvtec_tree(tmp_path / "mvtec", categories=("alpha",), size=64, n_train=2, n_good=2, n_per_defect=1)
    root = tmp_path / "visa"
    to_visa(src, root, tmp_path / "twin")
    split_file = root / "split_csv" / "1cls.csv"
    with open(split_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(split_file, "a", newline="") as handle:  # beta: train rows only, as a split file cut short
        csv.writer(handle).writerows([["beta", "train", "normal", r["image"], ""] for r in rows if r["split"] == "train"])
    anomalous = next(r for r in rows if r["label"] == "anomaly")
    (root / anomalous["mask"]).write_bytes(b"")  # alpha: an empty mask file
    results = tmp_path / "out"
    line = _refused(capsys, _args("test", root, "visa", "[alpha,beta,gamma]", results, resnet18_weights), results)
    assert "3 problem(s) found before any work" in line
    assert f"[visa_alpha] cannot read image {root / anomalous['mask']}: empty file" in line
    assert f"[visa_beta] {split_file} lists no test images of 'beta'" in line
    assert f"[visa_gamma] category 'gamma' is not in {split_file} (it lists ['alpha', 'beta'])" in line


def test_files_of_a_later_category_are_read_up_front(tmp_path, resnet18_weights, capsys):
    """Headers, not pixels: an empty image, a file that is not an image, a mask of another size."""
    root = make_mvtec_tree(tmp_path / "data", categories=("alpha", "beta"), size=64, n_train=2, n_good=2, n_per_defect=1)
    (root / "beta" / "train" / "good" / "000.png").write_bytes(b"")
    (root / "beta" / "test" / "good" / "001.png").write_text("not an image")
    mask = root / "beta" / "ground_truth" / "crack" / "000_mask.png"
    from PIL import Image

    Image.new("L", (10, 10)).save(mask)
    results = tmp_path / "out"
    line = _refused(capsys, _args("test", root, "mvtec_ad", "[alpha,beta]", results, resnet18_weights), results)
    assert "3 problem(s)" in line
    assert f"[mvtec_beta] cannot read image {root / 'beta' / 'train' / 'good' / '000.png'}: empty file" in line
    assert f"[mvtec_beta] cannot read image {root / 'beta' / 'test' / 'good' / '001.png'}: UnidentifiedImageError" in line
    assert f"[mvtec_beta] mask {mask} is 10x10, its image {root / 'beta' / 'test' / 'crack' / '000.png'} 64x64" in line


def test_every_model_folder_is_read_before_the_first_category_is_evaluated(tmp_path, resnet18_weights, capsys):
    root = make_mvtec_tree(tmp_path / "data", categories=("alpha", "beta", "gamma"), size=64, n_train=2, n_good=2,
                           n_per_defect=1)
    good = tmp_path / "good"
    shutil.copytree(FIXTURE / "model", good)
    truncated = tmp_path / "truncated"
    shutil.copytree(FIXTURE / "model", truncated)
    index = truncated / "nnscorer_search_index.faiss"
    index.write_bytes(index.read_bytes()[:1000])  # a copy cut short
    results = tmp_path / "out"
    args = _args("test", root, "mvtec_ad", "[alpha,beta,gamma]", results, resnet18_weights,
                 "--model.model_paths", f"[{good},{truncated},{tmp_path / 'missing'}]", "--data.resize", "256",
                 "--data.imagesize", "224")
    line = _refused(capsys, args, results)
    assert "2 problem(s)" in line
    assert f"[mvtec_beta] {index}: damaged faiss index (1000 bytes; its header announces" in line
    assert f"[mvtec_gamma] model folder not found: {tmp_path / 'missing'}" in line


def test_index_header_is_read_without_the_vectors(tmp_path):
    import faiss
    import numpy as np

    index = faiss.IndexFlatL2(5)
    index.add(np.zeros((7, 5), dtype=np.float32))
    path = tmp_path / "bank.faiss"
    faiss.write_index(index, str(path))
    assert read_index_header(path) == (5, 7)
    faiss.write_index(faiss.IndexFlatIP(5), str(tmp_path / "ip.faiss"))
    with pytest.raises(ModelFormatError, match="not a faiss IndexFlatL2 file"):
        read_index_header(tmp_path / "ip.faiss")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelFormatError, match="damaged faiss index"):
        read_index_header(path)
