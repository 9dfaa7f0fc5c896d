"""Bad input ends in one clear line on stderr, a non-zero exit, no traceback, no half-written results."""

from __future__ import annotations

import os
import pickle
import shutil

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_lightning.cli import main

from .conftest import FIXTURE


@pytest.fixture
def setup(tmp_path, resnet18_weights):
    """A writable copy of the original's fixture: data, model, weights."""
    data = tmp_path / "data"
    model = tmp_path / "model"
    shutil.copytree(FIXTURE / "data", data)
    shutil.copytree(FIXTURE / "model", model)
    return {"data": data, "model": model, "weights": resnet18_weights, "results": tmp_path / "results"}


def _args(s, **over) -> list[str]:
    values = {
        "data.root": str(s["data"]),
        "data.categories": "[weave]",
        "data.num_workers": "0",
        "model.model_paths": f"[{s['model']}]",
        "model.backbone_weights": str(s["weights"]),
        "trainer.accelerator": "cpu",
        "trainer.logger": "false",
        "results_dir": str(s["results"]),
    }
    values.update(over)
    out = ["test"]
    for key, value in values.items():
        out += [f"--{key}", value]
    return out


def _fails(capsys, args, expected: str, code: int = 2) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code
    assert expected in err, err
    assert "Traceback" not in err
    return err


def _no_results(s) -> None:
    assert not (s["results"] / "results.csv").exists()


def test_1_data_root_missing(setup, capsys):
    _fails(capsys, _args(setup, **{"data.root": str(setup["data"] / "nope")}), "data root not found")
    _no_results(setup)


def test_2_category_missing_or_without_test(setup, capsys):
    _fails(capsys, _args(setup, **{"data.categories": "[zipper]"}), "category folder not found")
    shutil.rmtree(setup["data"] / "weave" / "test")
    _fails(capsys, _args(setup), "no test/ folder in")
    _no_results(setup)


def test_2_categories_read_as_numbers_ask_for_quotes(setup, capsys):
    """BTAD's categories are 01, 02, 03: unquoted, YAML reads them as the numbers 1, 2, 3."""
    _fails(capsys, _args(setup, **{"data.categories": "[01, 02]"}), "data.categories: [1, 2] were read as numbers")
    _fails(capsys, _args(setup, **{"data.categories": '["01"]'}), "category folder not found")
    _no_results(setup)


def test_3_test_folder_without_images(setup, capsys):
    for folder in (setup["data"] / "weave" / "test").iterdir():
        shutil.rmtree(folder)
        folder.mkdir()
    shutil.rmtree(setup["data"] / "weave" / "ground_truth")
    _fails(capsys, _args(setup), "no images in")
    _no_results(setup)


def test_4_missing_mask_and_extra_mask(setup, capsys):
    mask = setup["data"] / "weave" / "ground_truth" / "hole" / "001_mask.png"
    mask.rename(mask.with_name("009_mask.png"))
    _fails(capsys, _args(setup), "no ground-truth mask for test/hole/001.png")
    (setup["data"] / "weave" / "test" / "hole" / "001.png").unlink()
    _fails(capsys, _args(setup), "masks without a test image: ['009_mask']")
    _no_results(setup)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_5_truncated_image_names_the_file(setup, capsys, workers):
    path = setup["data"] / "weave" / "test" / "spot" / "001.png"
    path.write_bytes(path.read_bytes()[:300])
    err = _fails(capsys, _args(setup, **{"data.num_workers": workers}), "cannot read image")
    assert "spot/001.png" in err and "DataLoader worker" not in err
    _no_results(setup)


def test_6_mask_size_differs(setup, capsys):
    Image.new("L", (100, 100)).save(setup["data"] / "weave" / "ground_truth" / "spot" / "000_mask.png")
    _fails(capsys, _args(setup), "000_mask.png is 100x100, its image")
    _no_results(setup)


def test_7_model_path_missing_or_incomplete(setup, capsys):
    _fails(capsys, _args(setup, **{"model.model_paths": f"[{setup['model'] / 'nope'}]"}), "model folder not found")
    (setup["model"] / "patchcore_params.pkl").unlink()
    _fails(capsys, _args(setup), "missing patchcore_params.pkl")
    (setup["model"] / "nnscorer_search_index.faiss").unlink()
    _fails(capsys, _args(setup), "no .faiss index")
    _no_results(setup)


@pytest.mark.parametrize(
    "content, expected",
    [
        ([1, 2, 3], "expected a dict of PatchCore parameters, got list"),
        ({"backbone.name": "resnet18"}, "missing keys"),
        ("vgg", "expected a dict"),
    ],
)
def test_8_params_not_a_dict_or_missing_keys(setup, capsys, content, expected):
    with open(setup["model"] / "patchcore_params.pkl", "wb") as handle:
        pickle.dump(content, handle)
    _fails(capsys, _args(setup), expected)
    _no_results(setup)


def test_8_unsupported_backbone(setup, capsys):
    path = setup["model"] / "patchcore_params.pkl"
    params = pickle.loads(path.read_bytes())
    params["backbone.name"] = "efficientnet_b7"
    path.write_bytes(pickle.dumps(params))
    _fails(capsys, _args(setup), "unsupported backbone 'efficientnet_b7'; supported: densenet201")
    _no_results(setup)


@pytest.mark.parametrize("dim, rows, expected", [(512, 10, "dimension 512"), (1024, 0, "holds 0 vectors")])
def test_9_faiss_dimension_or_empty(setup, capsys, dim, rows, expected):
    index = faiss.IndexFlatL2(dim)
    if rows:
        index.add(np.zeros((rows, dim), dtype=np.float32))
    faiss.write_index(index, str(setup["model"] / "nnscorer_search_index.faiss"))
    _fails(capsys, _args(setup), expected)
    _no_results(setup)


def test_10_model_count(setup, capsys):
    paths = f"[{setup['model']},{setup['model']}]"
    _fails(capsys, _args(setup, **{"model.model_paths": paths}), "model.model_paths has 2 entries for 1 categories")
    _no_results(setup)


def test_11_weights_missing_not_a_state_dict_other_architecture(setup, capsys, tmp_path):
    _fails(capsys, _args(setup, **{"model.backbone_weights": str(tmp_path / "none.pth")}), "weights file for 'resnet18' not found")
    torch.save({"a": 1}, tmp_path / "dict.pth")
    _fails(capsys, _args(setup, **{"model.backbone_weights": str(tmp_path / "dict.pth")}), "are not a state_dict")
    import torchvision

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    _fails(capsys, _args(setup, **{"model.backbone_weights": str(tmp_path / "r50.pth")}), "do not fit 'resnet18'")
    _no_results(setup)


def test_12_imagesize_differs_from_the_model(setup, capsys):
    _fails(capsys, _args(setup, **{"data.imagesize": "192"}), "built for input_shape (3, 224, 224), but data.imagesize is 192")
    _no_results(setup)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_13_pickle_that_runs_code(setup, capsys, tmp_path):
    marker = tmp_path / "ran"
    (setup["model"] / "patchcore_params.pkl").write_bytes(pickle.dumps({"backbone.name": _Payload(marker)}))
    _fails(capsys, _args(setup), "refused to load posix.system")
    assert not marker.exists()
    _no_results(setup)


def test_14_results_dir_not_writable(setup, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, _args(setup, results_dir=str(blocker / "results")), "cannot be written")


def test_15_unknown_config_key(setup, capsys):
    args = _args(setup) + ["--model.not_a_key", "1"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not_a_key" in err and "Traceback" not in err


def test_sidecar_weights_are_checked(setup, capsys, tmp_path):
    fit_dir = tmp_path / "fit"
    base = _args(setup, results_dir=str(fit_dir))
    base[0] = "fit"
    main(base + ["--model.backbones", "[resnet18]", "--model.percentage", "0.2"])
    folder = fit_dir / "models" / "mvtec_weave"
    paths = {"model.model_paths": f"[{folder}]"}
    _fails(capsys, _args(setup, **paths, **{"model.backbone_weights": "random"}),
           "was built with resnet18 weights sha256")
    main(_args(setup, **paths, **{"model.backbone_weights": "random", "model.allow_other_weights": "true"}))
    assert (setup["results"] / "results.csv").is_file()
