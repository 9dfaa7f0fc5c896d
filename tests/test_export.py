"""export → deploy/patchcore_onnx.py: predict's scores and maps, test's AUROC, without torch.

Three models: the original's fixture model, a model ``fit`` builds from the demo data, and a
two-member ensemble (k = 3, the search chunked). Each is tested, exported (with the thresholds
``test`` wrote, and as OpenVINO IR) and predicted; the runtime then scores the same folder with
ONNX Runtime in a process where ``import torch`` fails, and with OpenVINO's CPU plugin at f32 on
the ONNX file and on the IR.

Tolerances. Between two runs of a graph (chunked or not, another batch size) and of the search
graph against float64, the bounds of tests/bounds.py, computed from the outputs. Between the runtime
and ``predict``, the export's contract: 1e-4 relative for scores and 1e-4 of the maps' range over
the test set (the span ``test`` normalises them by) for the segmentation, and test's instance AUROC
from the runtime's scores. That is a float32 rounding argument, not a derived bound: the runtime's
backbone rounds its sums otherwise (features a few u to a few tens of u from float64, as
tests/test_agreement.py measures for other kernels: ~1e-6 of a score) and its search computes its
candidates' distances as Σ (x - y)² in float32 ((D + 2) u of a distance, 6e-5 at D = 1024, ~1e-6
in practice) where ``predict`` rounds the float64 sum once; the a priori bound of the backbone's
rounding (bounds.FEATURE_ROUNDING) is ~1e-2 of a score, too loose to hold the contract to. The
bound from the runtimes' own features, measured against a float64 forward, is tight:
test_the_runtimes_scores_are_within_the_bound_of_their_features holds every runtime to it, and on
the three models it lies inside the contract.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore_lightning.anomaly_map import minmax_normalise
from patchcore_lightning.cli import PatchCoreCLI, main
from patchcore_lightning.data.synthetic import make_synthetic_mvtec
from patchcore_lightning.metrics import image_auroc

from .bounds import (
    U,
    auroc_shift_bound,
    chain_bound,
    embed_bound,
    formula_bound,
    normalised_mean,
    patch_score_shift,
    score_shift_bound,
    trapezoid_bound,
)
from .conftest import FIXTURE

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "patchcore_onnx.py"
SCORE_RTOL = 1e-4  # the export's contract (observed ≤ 3e-5: float32 rounding, see the module docstring)
MAP_RTOL = 1e-4  # of the map's range, the export's contract


def _heatmap_name(path: str) -> str:
    """predict's (and the runtime's) heatmap name of an input: its path without the extension (the
    test folders have no two inputs differing only in theirs)."""
    return path.rsplit(".", 1)[0]


def load_deploy():
    """deploy/patchcore_onnx.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("patchcore_onnx", DEPLOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_torch(tmp_path: Path) -> dict[str, str]:
    """An environment where ``import torch`` raises ImportError: a ``torch`` package that refuses
    to load, first on the path."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    return {**os.environ, "PYTHONPATH": str(blocker.parent)}


def run_deploy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEPLOY), *args], env=without_torch(tmp_path),
                          capture_output=True, text=True, timeout=600)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class Case:
    """One model: test's result, predict's rows and raw maps, the export folder."""

    def __init__(self, common: list[str], model_folder: Path, test_dir: Path, out: Path) -> None:
        self.test_dir, self.out, self.common = test_dir, out, common
        cli = PatchCoreCLI(args=["test", *common, "--model.model_paths", f"[{model_folder}]",
                                 "--results_dir", str(out / "test")])
        self.result = cli.evaluation
        samples = cli.datamodule.test_dataset.samples
        self.labels = {samples[int(i)].image.relative_to(test_dir).as_posix(): int(label)
                       for i, label in zip(self.result.indices, self.result.labels)}
        self.raw_scores = {samples[int(i)].image.relative_to(test_dir).as_posix(): row.double().numpy()
                           for i, row in zip(self.result.indices, self.result.raw_scores)}  # (M,) each
        thresholds = str(out / "test" / "thresholds.csv")
        main(["predict", *common, "--model.model_paths", f"[{model_folder}]", "--data.predict_dir", str(test_dir),
              "--model.thresholds_csv", thresholds, "--model.save_raw_maps", "true", "--results_dir", str(out / "predict")])
        self.predict = {r["path"]: r for r in read_csv(out / "predict" / "predictions.csv")}
        main(["export", *common, "--model.model_paths", f"[{model_folder}]", "--model.thresholds_csv", thresholds,
              "--export.format", "openvino", "--results_dir", str(out)])
        self.export = out / "export" / model_folder.name
        self.meta = json.loads((self.export / "metadata.json").read_text())

    def raw_map(self, path: str) -> np.ndarray:
        return np.load(self.out / "predict" / "heatmaps" / f"{_heatmap_name(path)}.npy")

    def check(self, rows: dict[str, dict], maps: dict[str, np.ndarray] | None = None) -> None:
        """Rows (and maps) of the runtime against predict's and test's."""
        assert sorted(rows) == sorted(self.predict) == sorted(self.labels)
        assert list(next(iter(rows.values()))) == list(next(iter(self.predict.values())))  # predict's columns
        members = [k for k in next(iter(rows.values())) if k.startswith("score_member")] or ["score"]
        image_t = self.meta["thresholds"]["image_threshold"]
        for path, row in rows.items():
            theirs = self.predict[path]
            for key in ["score", *members]:
                assert float(row[key]) == pytest.approx(float(theirs[key]), rel=SCORE_RTOL), (path, key)
            score = float(row["score"])
            assert int(row["is_anomalous"]) == int(score >= image_t)
            if abs(score - image_t) > SCORE_RTOL * abs(image_t):  # else either side is right
                assert row["is_anomalous"] == theirs["is_anomalous"], path
        if maps is not None:
            pixel_t = self.meta["thresholds"]["pixel_threshold"]
            # the range the maps are normalised by in test (min-max over the category): an error of
            # 1e-4 of it is 1e-4 on the normalised maps the pixel metrics rank
            theirs_all = [self.raw_map(path) for path in maps]
            tol = MAP_RTOL * float(max(m.max() for m in theirs_all) - min(m.min() for m in theirs_all))
            for path, ours in maps.items():
                theirs = self.raw_map(path)
                assert ours.shape == theirs.shape and float(np.abs(ours - theirs).max()) <= tol, path
                # pixels may change side only within tol of the threshold
                near = int((np.abs(theirs - pixel_t) <= tol).sum())
                assert abs(int(rows[path]["anomalous_pixels"]) - int(theirs.__ge__(pixel_t).sum())) <= near, path
                assert int(rows[path]["anomalous_pixels"]) == int((ours >= pixel_t).sum())
        # test's instance AUROC, from the runtime's member scores normalised as test normalises them:
        # within what the scores' observed differences from test's can reorder (each member's move
        # delta becomes 4 delta / (span - 2 delta) after the normalisation; the mean averages them;
        # both AUROCs round in float32), which is no pair at all where no two images tie that closely
        order = sorted(rows)
        member_scores = torch.tensor([[float(rows[p][k]) for k in members] for p in order], dtype=torch.float32)
        labels = torch.tensor([self.labels[p] for p in order])
        theirs = np.stack([self.raw_scores[p] for p in order])  # (N, M) test's raw scores
        delta = np.abs(member_scores.double().numpy() - theirs).max(axis=0)  # (M,)
        normalised, moved = normalised_mean(theirs.T, delta)  # (N,), the most it moves
        bound = auroc_shift_bound(normalised, labels.numpy(), moved) + 2 * trapezoid_bound(len(order) + 1, U)
        got = image_auroc(minmax_normalise(member_scores.T).mean(dim=0), labels)
        assert abs(got - self.result.instance_auroc) <= bound, (got, self.result.instance_auroc, bound)


def runtime_rows(deploy, export: Path, images: Path, out: Path, runtime: str, graph: str, batch: int = 8):
    """Score with the runtime in-process; rows by path, and each image's segmentation."""
    model = deploy.Runtime(export, runtime, graph)
    rows = deploy.score_folder(model, images, out, batch, heatmaps=True, save_raw_maps=True)
    maps = {r["path"]: np.load(out / "heatmaps" / f"{_heatmap_name(r['path'])}.npy") for r in rows if "error" not in r}
    return {r["path"]: r for r in read_csv(out / "predictions.csv")}, maps


def _check_runtimes(case: Case, tmp_path: Path) -> None:
    result = run_deploy(tmp_path, "--model", str(case.export), "--images", str(case.test_dir), "--out",
                        str(tmp_path / "ort"), "--heatmaps", "--save-raw-maps", "--batch-size", "8", "--runtime", "onnxruntime")
    assert result.returncode == 0, result.stderr
    rows = {r["path"]: r for r in read_csv(tmp_path / "ort" / "predictions.csv")}
    maps = {p: np.load(tmp_path / "ort" / "heatmaps" / f"{_heatmap_name(p)}.npy") for p in rows}
    case.check(rows, maps)
    deploy = load_deploy()
    for graph in ("onnx", "ir"):
        rows, maps = runtime_rows(deploy, case.export, case.test_dir, tmp_path / f"ov_{graph}", "openvino", graph)
        case.check(rows, maps)


# ------------------------------------------------------------------------------------ the three models
@pytest.fixture(scope="module")
def fixture_case(tmp_path_factory, resnet18_weights):
    out = tmp_path_factory.mktemp("export_fixture")
    common = ["--data.root", str(FIXTURE / "data"), "--data.categories", "[weave]", "--data.num_workers", "0",
              "--data.batch_size", "4", "--model.backbone_weights", str(resnet18_weights),
              "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    return Case(common, FIXTURE / "model", FIXTURE / "data" / "weave" / "test", out)


def _demo_case(tmp_path_factory, weights, name: str, *model_args: str) -> Case:
    """A model ``fit`` builds from the demo's data (one category, the demo's resize and crop)."""
    data = make_synthetic_mvtec(tmp_path_factory.mktemp("demo_data"), ("grain",))
    out = tmp_path_factory.mktemp(name)
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), "--data.root", str(data), "--data.categories", "[grain]",
              "--data.num_workers", "0", "--trainer.logger", "false", "--model.save_segmentation_images", "false",
              "--model.backbone_weights", str(weights), *model_args]
    main(["fit", *common, "--results_dir", str(out / "fit")])
    return Case(common, out / "fit" / "models" / "mvtec_grain", data / "grain" / "test", out)


@pytest.fixture(scope="module")
def demo_case(tmp_path_factory, resnet18_weights):
    # the demo's settings with resnet18 (seeded) for wideresnet50: CI's 2 cores
    return _demo_case(tmp_path_factory, resnet18_weights, "export_demo", "--model.backbones", "[resnet18]",
                      "--model.pretrain_embed_dimension", "256", "--model.target_embed_dimension", "192")


@pytest.fixture(scope="module")
def ensemble_case(tmp_path_factory, resnet18_weights):
    case = _demo_case(
        tmp_path_factory, f"{{resnet18: {resnet18_weights}, resnet50: random}}", "export_ensemble",
        "--model.backbones", "[resnet18,resnet50]", "--model.layers", "{resnet18: [layer2, layer3], resnet50: [layer2]}",
        "--model.pretrain_embed_dimension", "96", "--model.target_embed_dimension", "64",
        "--model.anomaly_scorer_num_nn", "3", "--model.percentage", "0.5",
    )
    return case


def test_fixture_model_runtime_equals_predict(fixture_case, tmp_path):
    _check_runtimes(fixture_case, tmp_path)


def test_demo_model_runtime_equals_predict(demo_case, tmp_path):
    _check_runtimes(demo_case, tmp_path)


def test_export_without_model_paths_takes_the_folders_fit_wrote(demo_case, tmp_path):
    fit_dir = demo_case.out / "fit"
    main(["export", *demo_case.common, "--results_dir", str(fit_dir)])
    meta = json.loads((fit_dir / "export" / "mvtec_grain" / "metadata.json").read_text())
    assert meta["source"] == str(fit_dir / "models" / "mvtec_grain")
    assert meta["thresholds"] is None and meta["members"] == demo_case.meta["members"]
    with pytest.raises(SystemExit):
        main(["export", *demo_case.common, "--results_dir", str(tmp_path)])  # nothing fit there


def test_ensemble_runtime_equals_predict(ensemble_case, tmp_path):
    assert [m["k"] for m in ensemble_case.meta["members"]] == [3, 3]
    _check_runtimes(ensemble_case, tmp_path)


def test_ensemble_chunked_search_equals_one_block(ensemble_case, tmp_path):
    """The banks searched in chunks of 3 rows (a Loop each) give the one-block scores."""
    from patchcore_lightning.export import export_model
    from patchcore_lightning.model import Backbones, PatchCore

    meta = ensemble_case.meta
    deploy = load_deploy()
    one = deploy.Runtime(ensemble_case.export, "onnxruntime", "onnx")
    model = PatchCore.from_folder(meta["source"], meta["preprocessing"]["imagesize"],
                                  Backbones(_ensemble_weights(ensemble_case)), allow_other_weights=False)
    rows = [len(b) for b in model.banks]
    # 4 KiB blocks: chunks of 1024 / max(N, D) rows, at least k
    chunked_path = export_model(model, tmp_path / "chunked", meta["preprocessing"]["resize"],
                                thresholds=meta["thresholds"], block_bytes=4096)
    import onnx

    graph = onnx.load(str(chunked_path), load_external_data=False).graph
    assert sum(n.op_type == "Loop" for n in graph.node) == 2 and all(r > 3 for r in rows)
    chunked = deploy.Runtime(tmp_path / "chunked", "onnxruntime", "onnx")
    images = np.random.default_rng(0).integers(0, 256, (3, *meta["input"]["shape"][1:]), dtype=np.uint8)
    # the same graph but for the search's chunks: only the formula's sums may round otherwise
    outputs = one(images)
    for a, b, bound in zip(outputs, chunked(images), _graph_search_bounds(model, outputs, features_shift=False)):
        assert bool((np.abs(a - b) <= bound).all())


def _graph_search_bounds(model, outputs, features_shift: bool) -> list[np.ndarray]:
    """How far two runs of an exported graph may be apart, per output (score (B,), member_scores
    (B, M), segmentation (B, H, W)), from ``outputs`` of one run. Each member takes its candidates
    by the formula |x|² + |y|² - 2 x·y in float32: where the two runs' candidates differ, a row one
    run missed was replaced by one whose distance is within twice the formula's rounding of it
    (bounds.formula_bound, with |x| <= |y| + sqrt(d) <= the bank's largest norm + sqrt(the member's
    score)); the candidates' distances Σ (x - y)² are each within (D + 2) u of exact. With
    ``features_shift`` the features come from other kernels too (bounds.score_shift_bound, at
    FEATURE_ROUNDING). The ensemble mean rounds M more times; the maps move no further than their
    patches (bilinear and blur average) plus the rounding of the resize, the mean and the 33-tap
    blur twice."""
    score, member_scores, segmentation = (np.asarray(o, dtype=np.float64) for o in outputs)
    shifts = []
    for m, (p, bank) in enumerate(zip(model.params, model.banks)):
        s = torch.as_tensor(member_scores[:, m])  # (B,)
        y_norm = float(bank.vectors.double().norm(dim=1).max())
        D = p.target_embed_dimension
        shift = 2 * formula_bound(y_norm + s.sqrt(), torch.tensor(y_norm), D) + 2 * (D + 2) * U * s
        if features_shift:
            shift = shift + score_shift_bound(s, y_norm)
        shifts.append(shift.numpy())  # (B,)
    shifts = np.stack(shifts, axis=1)  # (B, M)
    M = shifts.shape[1]
    score_bound = shifts.mean(axis=1) + 2 * M * U * score  # (B,)
    map_bound = shifts.max(axis=1)[:, None, None] + chain_bound(2 * (33 + 1) + 6 + M, segmentation.max())
    return [score_bound, shifts, map_bound]


def _ensemble_weights(case: Case) -> dict:
    # the ensemble's backbone_weights, as the fixture gave them (resnet18 seeded, resnet50 random)
    sidecar = json.loads((Path(case.meta["source"]) / "patchcore_lightning.json").read_text())
    return sidecar["backbone_weights"]


# ------------------------------------------------------------------------------------ the contract
def test_batch_is_dynamic(fixture_case):
    deploy = load_deploy()
    runtime = deploy.Runtime(fixture_case.export, "onnxruntime", "onnx")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    eight = runtime(images)
    assert [o.shape for o in eight] == [(8,), (8, 1), (8, 224, 224)]
    # another batch size may run other convolution and GEMM kernels: the features and the formula round otherwise
    from patchcore_lightning.model import PatchCore

    model = PatchCore.from_folder(fixture_case.meta["source"], backbone_weights="random", allow_other_weights=True)
    bounds = _graph_search_bounds(model, eight, features_shift=True)
    for i in (0, 5):
        one = runtime(images[i : i + 1])
        for a, b, bound in zip(one, eight, bounds):
            assert bool((np.abs(a[0] - b[i]) <= bound[i]).all())


def test_metadata_states_the_contract(fixture_case, resnet18_weights):
    from patchcore_lightning.backbones import file_sha256

    meta = fixture_case.meta
    assert meta["format_version"] == 1
    assert meta["input"] == {"name": "images", "shape": ["batch", 224, 224, 3], "dtype": "uint8", "layout": "NHWC, RGB"}
    prep = meta["preprocessing"]
    assert (prep["resize"], prep["imagesize"], prep["center_crop"], prep["resample"]) == (256, 224, [224, 224], "bilinear")
    assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]
    [member] = meta["members"]
    assert (member["backbone"], member["layers"], member["k"]) == ("resnet18", ["layer2", "layer3"], 1)
    assert member["weights_sha256"] == file_sha256(resnet18_weights)
    thresholds = read_csv(fixture_case.out / "test" / "thresholds.csv")[0]
    assert meta["thresholds"]["image_threshold"] == float(thresholds["image_threshold"])  # repr in both: exact
    assert meta["openvino_compile_config"] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert {"openvino_xml", "openvino_bin", "onnx"} <= set(meta["files"])


def test_runtime_skips_unreadable_files_like_predict(fixture_case, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(fixture_case.test_dir, folder / "line1")
    (folder / "line1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not an image")
    result = run_deploy(tmp_path, "--model", str(fixture_case.export), "--images", str(folder), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "o" / "predictions.csv")
    assert len(rows) == 8 and all(r["path"].startswith("line1/") for r in rows)
    skipped = read_csv(tmp_path / "o" / "skipped.csv")
    assert [s["path"] for s in skipped] == ["line1/broken.png"] and skipped[0]["reason"]


def test_runtime_refuses_metadata_that_disagrees_with_the_graph(fixture_case, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(fixture_case.export, export)
    meta = json.loads((export / "metadata.json").read_text())
    meta["members"][0]["k"] = 3  # the graph averages 1 neighbour
    (export / "metadata.json").write_text(json.dumps(meta))
    for runtime in ("onnxruntime", "openvino"):
        result = run_deploy(tmp_path, "--model", str(export), "--images", str(fixture_case.test_dir),
                            "--out", str(tmp_path / "o"), "--runtime", runtime)
        assert result.returncode == 2 and "disagree" in result.stderr and "exported with another metadata.json" in result.stderr
    meta["members"][0]["k"] = 1
    meta["preprocessing"]["imagesize"] = meta["input"]["shape"][1] = 256
    (export / "metadata.json").write_text(json.dumps(meta))
    result = run_deploy(tmp_path, "--model", str(export), "--images", str(fixture_case.test_dir), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "the graph takes" in result.stderr
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_runtime_refuses_a_newer_format(fixture_case, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(fixture_case.export, export)
    meta = json.loads((export / "metadata.json").read_text())
    meta["format_version"] = 2
    (export / "metadata.json").write_text(json.dumps(meta))
    result = run_deploy(tmp_path, "--model", str(export), "--images", str(fixture_case.test_dir), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "export format version 2; this runtime reads up to 1" in result.stderr


def test_export_of_a_folder_that_cannot_be_loaded_fails_as_test_does(resnet18_weights, tmp_path, capsys):
    bad = tmp_path / "model"
    shutil.copytree(FIXTURE / "model", bad)
    (bad / "nnscorer_search_index.faiss").write_bytes(b"not an index")
    common = ["--data.root", str(FIXTURE / "data"), "--data.categories", "[weave]", "--model.model_paths", f"[{bad}]",
              "--model.backbone_weights", str(resnet18_weights), "--trainer.logger", "false",
              "--trainer.accelerator", "cpu", "--data.num_workers", "0"]
    errors = []
    for command in ("test", "export"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, *common, "--results_dir", str(tmp_path / command)])
        assert exit_info.value.code == 2
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert errors[0] == errors[1] and "not a faiss IndexFlatL2 file" in errors[0]  # the up-front check of test
    assert not (tmp_path / "export" / "export").exists()


def test_external_data_loads_with_one_call(fixture_case, resnet18_weights, tmp_path):
    """A bank written beside the graph (what a bank past 2 GB gets) scores the same."""
    from patchcore_lightning.export import export_model
    from patchcore_lightning.model import Backbones, PatchCore

    meta = fixture_case.meta
    backbones = Backbones(str(resnet18_weights))
    model = PatchCore.from_folder(FIXTURE / "model", 224, backbones)
    export_model(model, tmp_path / "ext", 256, backbones.sha256, meta["thresholds"], external_data=True)
    assert (tmp_path / "ext" / "model.onnx.data").stat().st_size > len(model.banks[0]) * 1024 * 4
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 1 << 20
    deploy = load_deploy()
    images = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    for a, b in zip(deploy.Runtime(fixture_case.export, "onnxruntime")(images), deploy.Runtime(tmp_path / "ext", "onnxruntime")(images)):
        np.testing.assert_array_equal(a, b)  # the same graph and weights, stored elsewhere


@pytest.mark.parametrize("offset", [0.0, 10.0])
@pytest.mark.parametrize("k", [1, 3])
def test_search_graph_is_exact(k, offset):
    """The graph's chunked search against exact float64 distances: 10 rows in chunks of k + 4 (the
    last one shorter), and in one block. With ``offset`` 10 every vector has a norm ~28 at distances
    ~1: the formula alone cancels 3 digits (float32 formula here: ~1e-3 of a distance), so only
    distances recomputed as Σ (x - y)² meet the bound below (~1e-6)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from patchcore_lightning.export import OPSET, _Builder, _search_nodes
    from patchcore_lightning.memory_bank import RERANK_EXTRA

    rng = np.random.default_rng(k)
    D, c = 8, k + RERANK_EXTRA
    queries = (offset + 0.3 * rng.normal(size=(5, D))).astype(np.float32)  # (Q, D)
    bank = (offset + 0.3 * rng.normal(size=(10, D))).astype(np.float32)  # (R, D)
    exact = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)  # (Q, R)
    ranked = np.sort(exact, axis=1)
    expected = ranked[:, :k].mean(axis=1)  # (Q,)
    # the k nearest are among the formula's c candidates: the c-th nearest lies further than the
    # k-th by more than twice the formula's rounding
    x_norm = torch.as_tensor(np.linalg.norm(queries.astype(np.float64), axis=1))
    y_norm = torch.tensor(float(np.linalg.norm(bank.astype(np.float64), axis=1).max()))
    assert bool((ranked[:, c - 1] - ranked[:, k - 1] > 2 * formula_bound(x_norm, y_norm, D).numpy()).all())
    for block_bytes, loops in ((4 * c * D, 1), (1 << 20, 0)):  # chunks of c rows; one block
        graph = helper.make_graph([], "search", [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["Q", D])], [])
        out = _search_nodes(_Builder(graph, "s_"), "q", bank, k, 5, block_bytes)
        graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["Q"]))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        onnx.checker.check_model(model)
        assert sum(n.op_type == "Loop" for n in graph.node) == loops
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"q": queries})
        # Σ (x - y)² in float32: each term rounded by the subtraction and the square, D - 1 additions
        # of non-negative terms in any order (Higham (3.5)): (D + 2) u of the distance; the float32
        # mean of k of them: k + 1 more
        assert bool((np.abs(got - expected) <= (D + 2 + k + 1) * U * expected).all())


@pytest.mark.parametrize(("channels", "patchsize", "size"), [(16, 3, 32), (16, 3, 16), (10, 3, 7), (12, 1, 5), (8, 3, 100)])
def test_pooling_convolution_equals_embed(channels, patchsize, size):
    """A grouped convolution with ``pooling_conv_weight`` pools every patch's block as ``embed`` does."""
    import torch.nn.functional as F

    from patchcore_lightning.embedding import embed
    from patchcore_lightning.export import pooling_conv_weight

    x = torch.randn(2, channels, 6, 5, generator=torch.Generator().manual_seed(0))
    weight, groups = pooling_conv_weight(channels, patchsize, size)
    got = F.conv2d(x, weight, padding=(patchsize - 1) // 2, groups=groups)  # (B, size, h, w)
    expected, (h, w) = embed([x], patchsize, 1, size, size)  # (B*h*w, size)
    got = got.permute(0, 2, 3, 1).reshape(-1, size)
    # the same averages summed in another order, the convolution's weights 1/n rounded once: at most
    # n + 1 roundings on a path of its n-term sums, within bounds.embed_bound's count for embed
    assert bool(((got - expected).abs() <= embed_bound([x], patchsize, size, size)).all())


def test_the_runtime_names_heatmaps_as_predict_does():
    from patchcore_lightning.callbacks import heatmap_names

    deploy = load_deploy()
    paths = ["day1/000.png", "day1/001.JPG", "a.png", "a.jpg", "A.bmp", "sub/a.png", "b.tif"]
    for masks, raw_maps in ((False, False), (True, True)):
        assert deploy.heatmap_names(paths, masks, raw_maps) == heatmap_names(paths, masks, raw_maps)
    for clash in (["a.png", "a.jpg", "a.png.bmp"], ["a.png", "a_mask.png"]):
        with pytest.raises(ValueError):
            heatmap_names(clash, masks=True)
        with pytest.raises(ValueError):
            deploy.heatmap_names(clash, masks=True)


def test_export_without_onnx_installed_says_which_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    from patchcore_lightning import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--data.root", str(FIXTURE / "data"), "--data.categories", "[weave]",
              "--model.model_paths", f"[{FIXTURE / 'model'}]", "--results_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        'error: export needs onnx, which is not installed: pip install -e ".[onnx]"')
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------ the contract from a bound
def _runtime_with_features(deploy, export: Path, runtime: str, graph: str, pixels: np.ndarray, members: int):
    """The runtime's three outputs for ``pixels`` and each member's patch features (B, N, D): the
    graph's intermediate ``features<m>`` tensors exposed as extra outputs."""
    names = [f"features{m}" for m in range(members)]
    path = export / ("model.xml" if graph == "ir" else "model.onnx")
    if runtime == "onnxruntime":
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path))
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run([*deploy.OUTPUT_NAMES, *names], {"images": pixels})
        return values[:3], values[3:]
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.add_outputs(names)
    result = core.compile_model(model, "CPU", dict(deploy.OPENVINO_F32)).create_infer_request().infer({"images": pixels})
    by_name = {name: np.array(value) for output, value in result.items() for name in output.get_names()}
    return [by_name[n] for n in deploy.OUTPUT_NAMES], [by_name[n] for n in names]


@pytest.mark.kernels
@pytest.mark.parametrize("case_name", ["fixture_case", "demo_case", "ensemble_case"])
def test_the_runtimes_scores_are_within_the_bound_of_their_features(case_name, request, resnet18_weights):
    """Each runtime's scores and maps against the torch model's on the same pixels, within the bound
    their features' measured distances to a float64 forward allow (tests/agreement.py's argument:
    nearest distances are 1-Lipschitz in the feature; the torch search rounds each distance once,
    the graph's Σ (x - y)² D + 2 times, both then average k; the members' mean and the maps average
    their members' moves). Where that bound lies inside the export's contract (1e-4 of a score,
    1e-4 of the maps' range), the contract holds by the bound: on the three models it is at most
    7.4e-5 of a score and 9.6e-5 of the range (the fixture model's, with features 14 u (torch) and
    8 to 15 u (the runtimes) from float64), 2e-5 to 4e-5 on the other two. The bound depends on the CPU's rounding, so the test holds the outputs to it and the
    contract checks above hold them to the contract."""
    from PIL import Image

    from patchcore_lightning.model import Backbones, PatchCore

    from .agreement import exact_extractor, exact_patch_features

    case = request.getfixturevalue(case_name)
    weights = _ensemble_weights(case) if case_name == "ensemble_case" else str(resnet18_weights)
    deploy = load_deploy()
    meta = case.meta
    prep = meta["preprocessing"]
    files = sorted(case.test_dir.rglob("*.png"))
    pixels = np.stack([deploy.prepare(Image.open(f), prep["resize"], tuple(prep["center_crop"])) for f in files])
    model = PatchCore.from_folder(meta["source"], prep["imagesize"], Backbones(weights))
    M, B = len(model), len(files)
    mean, std = torch.tensor(prep["mean"]).view(1, 3, 1, 1), torch.tensor(prep["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    exact, feats, scores, maps, patches = [], [], [], [], []
    with torch.no_grad():
        for m in range(M):
            exact.append(exact_patch_features(model, exact_extractor(model, m, torch.device("cpu")),
                                              (x.double() / 255 - mean.double()) / std.double(), m))  # (B*N, D) float64
            f, grid = model.patch_features((x.float() / 255 - mean) / std, m)  # test's ToTensor + Normalize
            score, segmentation, patch = model.score_features(f, grid, m, x.shape[-2:])
            feats.append(f.double())
            scores.append(score.double().numpy())  # (B,)
            maps.append(segmentation.double().numpy())  # (B, H, W)
            patches.append(patch.flatten(1).double().numpy())  # (B, N)
    ensemble_score, ensemble_map = np.mean(scores, axis=0), np.mean(maps, axis=0)
    runtimes = [("onnxruntime", "onnx"), ("openvino", "onnx"), ("openvino", "ir")]
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        # OpenVINO's CPU plugin runs on oneDNN and refuses to compile below its ISA ("bad combination")
        runtimes = runtimes[:1]
    for runtime, graph in runtimes:
        (rt_score, rt_members, rt_map), rt_feats = _runtime_with_features(deploy, case.export, runtime, graph, pixels, M)
        image_bounds = []
        for m, p in enumerate(model.params):
            k, D = p.anomaly_scorer_num_nn, p.target_embed_dimension
            e_torch = (feats[m] - exact[m]).norm(dim=1).view(B, -1).numpy()  # (B, N)
            e_rt = (torch.from_numpy(rt_feats[m]).reshape(-1, D).double() - exact[m]).norm(dim=1).view(B, -1).numpy()
            # the torch search rounds each distance once and averages k; the graph's Σ (x - y)² D + 2 times
            shift = patch_score_shift(e_torch + e_rt, patches[m], k, (k + 2) + (D + 2 + k + 1))  # (B, N)
            image_bounds.append(shift.max(axis=1))  # (B,)
            assert bool((np.abs(rt_members[:, m] - scores[m]) <= image_bounds[m]).all()), (runtime, m)
        mean_bound = np.mean(image_bounds, axis=0)  # (B,)
        score_bound = mean_bound + 2 * M * U * ensemble_score  # the members' mean rounds M times a side
        map_bound = mean_bound + chain_bound(2 * (33 + 1) + 6 + M, ensemble_map.reshape(B, -1).max(axis=1))
        assert bool((np.abs(rt_score - ensemble_score) <= score_bound).all()), runtime
        assert bool((np.abs(rt_map - ensemble_map).reshape(B, -1).max(axis=1) <= map_bound).all()), runtime
