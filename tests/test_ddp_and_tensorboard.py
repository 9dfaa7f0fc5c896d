"""Two DDP processes (gloo, CPU) give the single process's results.csv; TensorBoard holds every number."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from patchcore_lightning.cli import main
from patchcore_lightning.reporting import RESULTS_COLUMNS, read_results

ROOT = Path(__file__).parent.parent
RESIZE, IMAGESIZE = 72, 64


def _data_args(mvtec_root) -> list[str]:
    return [
        "--data.root", str(mvtec_root),
        "--data.categories", "[alpha,beta]",
        "--data.resize", str(RESIZE),
        "--data.imagesize", str(IMAGESIZE),
        "--data.batch_size", "2",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, mvtec_root, resnet18_weights):
    """A single-model folder (alpha) and a 2-member ensemble folder (beta), written by fit."""
    out = tmp_path_factory.mktemp("ddp_models")
    common = [
        *_data_args(mvtec_root),
        "--model.pretrain_embed_dimension", "96",
        "--model.target_embed_dimension", "64",
        "--model.percentage", "0.5",
        "--trainer.logger", "false",
    ]
    main(["fit", *common, "--data.categories", "[alpha]", "--model.backbones", "[resnet18]",
          "--model.backbone_weights", str(resnet18_weights), "--results_dir", str(out / "single")])
    main(["fit", *common, "--data.categories", "[beta]", "--model.backbones", "[resnet18,resnet50]",
          "--model.backbone_weights", f"{{resnet18: {resnet18_weights}, resnet50: random}}",
          "--model.layers", "{resnet18: [layer2, layer3], resnet50: [layer2]}", "--results_dir", str(out / "ensemble")])
    return [out / "single" / "models" / "mvtec_alpha", out / "ensemble" / "models" / "mvtec_beta"]


def _cli(mvtec_root, folders, weights, results_dir, *extra) -> subprocess.CompletedProcess:
    return _run([
        "test", *_data_args(mvtec_root),
        "--model.model_paths", "[" + ",".join(map(str, folders)) + "]",
        "--model.backbone_weights", f"{{resnet18: {weights}, resnet50: random}}",
        "--results_dir", str(results_dir), *extra,
    ])


def _run(cli_args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``lightning_cli.py`` in a process of its own (DDP launches its other ranks from it)."""
    args = [sys.executable, str(ROOT / "lightning_cli.py"), *cli_args]
    # One thread per process in both runs: Lightning gives each of W CPU processes cores / W threads,
    # and a CPU convolution may round differently with another thread count. The comparison is of
    # the sharding and the gathering, which must not change a bit.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    # a rank's one-line error may lie far above the other rank's traceback: both go into the message
    errors = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert proc.returncode == 0, errors + "\n...\n" + proc.stderr[-3000:]
    return proc


def _scalars(results_dir: Path) -> dict[str, float]:
    (version,) = (results_dir / "lightning_logs").iterdir()
    accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: accumulator.Scalars(tag)[-1].value for tag in tags["scalars"]}
    return scalars, tags


@pytest.mark.kernels
def test_two_processes_equal_one_and_tensorboard_holds_every_number(fitted, mvtec_root, resnet18_weights, tmp_path):
    _cli(mvtec_root, fitted, resnet18_weights, tmp_path / "one", "--trainer.devices", "1")
    proc = _cli(mvtec_root, fitted, resnet18_weights, tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "Evaluating dataset [mvtec_beta] (2/2)" in proc.stderr
    one, two = read_results(tmp_path / "one" / "results.csv"), read_results(tmp_path / "two" / "results.csv")
    assert list(one) == list(two) == ["mvtec_alpha", "mvtec_beta", "mean"]
    for row in one:
        for name in RESULTS_COLUMNS:
            assert two[row][name] == one[row][name], (row, name)  # same batches, one thread each: same bits
    # 7 test images per category, batches of 2, on 2 ranks: 4 + 3 images, none repeated (a repeat
    # fails compute()), each in the batch a single process puts it in, so the files are equal
    assert (tmp_path / "two" / "results.csv").read_text() == (tmp_path / "one" / "results.csv").read_text()

    # TensorBoard of the 2-process run (written by rank 0 alone): every number of results.csv
    scalars, tags = _scalars(tmp_path / "two")
    for row, metrics in two.items():
        for name, value in metrics.items():
            assert scalars[f"test/{row}/{name}"] == float(np.float32(value)), (row, name)  # stored as float32
    for category in ("mvtec_alpha", "mvtec_beta"):
        assert f"{category}/hardest_cases" in tags["images"] and f"{category}/roc" in tags["images"]
        assert f"{category}/pixel_pr" in tags["tensors"]
    assert len(list((tmp_path / "two" / "lightning_logs").iterdir())) == 1  # one logger: rank 0's


def test_more_ranks_than_images(tmp_path, resnet18_weights, fitted):
    from .conftest import make_mvtec_tree

    root = make_mvtec_tree(tmp_path / "tiny", categories=("alpha", "beta"), size=80, n_good=1, defects=("crack",), n_per_defect=1)
    _cli(root, fitted, resnet18_weights, tmp_path / "one", "--trainer.devices", "1", "--trainer.logger", "false")
    _cli(root, fitted, resnet18_weights, tmp_path / "three", "--trainer.devices", "3", "--trainer.strategy", "ddp",
         "--trainer.logger", "false")
    one, three = read_results(tmp_path / "one" / "results.csv"), read_results(tmp_path / "three" / "results.csv")
    for row in one:
        for name in RESULTS_COLUMNS:
            assert three[row][name] == pytest.approx(one[row][name], rel=0, abs=0, nan_ok=True), (row, name)  # equal
    assert (tmp_path / "three" / "results.csv").read_text() == (tmp_path / "one" / "results.csv").read_text()


def test_devices_without_a_strategy_fit_then_test_equal_one_process(mvtec_root, resnet18_weights, tmp_path):
    """``--trainer.devices 2`` and nothing else (Lightning resolves ``auto`` to DDP): ``test`` without
    model paths fits first, then evaluates; the banks and results.csv are the single process's."""
    args = [
        "test", *_data_args(mvtec_root), "--data.categories", "[alpha]",
        "--model.backbones", "[resnet18]", "--model.backbone_weights", str(resnet18_weights),
        "--model.pretrain_embed_dimension", "96", "--model.target_embed_dimension", "64",
        "--model.percentage", "0.5", "--trainer.logger", "false",
    ]
    _run([*args, "--results_dir", str(tmp_path / "one"), "--trainer.devices", "1"])
    # Rank 0 writes the model folder 3 s late (a slow disk), so a rank that went on to test without
    # waiting for the folder would look for it before it exists, every time.
    slow = tmp_path / "slow_rank0"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "if os.environ.get('LOCAL_RANK', '0') == '0':\n"
        "    from patchcore_lightning.model import PatchCore\n"
        "    save = PatchCore.save\n"
        "    def slow_save(self, *args, **kwargs):\n"
        "        print('rank 0 writes the model folder 3 s late', file=sys.stderr)\n"
        "        time.sleep(3)\n"
        "        return save(self, *args, **kwargs)\n"
        "    PatchCore.save = slow_save\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(slow), str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = _run([*args, "--results_dir", str(tmp_path / "two"), "--trainer.devices", "2"], env={"PYTHONPATH": pythonpath})
    assert "rank 0 writes the model folder 3 s late" in proc.stderr
    assert "Evaluating dataset [mvtec_alpha] (1/1)" in proc.stderr
    # 3 training images in batches of 2: one batch per rank, gathered in image order before the coreset
    one, two = (tmp_path / d / "models" / "mvtec_alpha" for d in ("one", "two"))
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and "nnscorer_search_index.faiss" in names
    for name in names:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert (tmp_path / "two" / "results.csv").read_text() == (tmp_path / "one" / "results.csv").read_text()


def test_every_ddp_strategy_leaves_the_model_unwrapped():
    """A DDPStrategy however made (by name, as an instance, as Lightning resolves auto) becomes the
    frozen-model DDP with its settings; other strategies stay; a DDPStrategy subclass is refused."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, StrategyRegistry

    from patchcore_lightning.module import FrozenModelDDPStrategy, leave_model_unwrapped

    given = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=77), start_method="popen")
    leave_model_unwrapped(given)
    assert type(given) is FrozenModelDDPStrategy
    assert given.process_group_backend == "gloo" and given._timeout == timedelta(seconds=77)
    for name in ("ddp", "ddp_spawn", "ddp_fork"):
        strategy = StrategyRegistry.get(name)
        leave_model_unwrapped(strategy)
        assert type(strategy) is FrozenModelDDPStrategy, name
    single = SingleDeviceStrategy("cpu")
    leave_model_unwrapped(single)
    assert type(single) is SingleDeviceStrategy
    with pytest.raises(ValueError, match="DeepSpeedStrategy wraps the model"):
        leave_model_unwrapped(DeepSpeedStrategy.__new__(DeepSpeedStrategy))
