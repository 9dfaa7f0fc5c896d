"""SIGINT and SIGTERM inside a category end the run with the resume line and exit 130 / 143;
results.csv then holds the finished categories only, and --resume true completes it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from patchcore_lightning.cli import main
from patchcore_lightning.reporting import read_results

from .conftest import FIXTURE, make_mvtec_tree

ROOT = Path(__file__).parent.parent
CATEGORIES = ("c1", "c2", "c3")


class InterruptAt(L.Callback):
    """At the first batch of ``category``: raise KeyboardInterrupt (``raise``, a Ctrl+C that reaches
    Lightning), or receive SIGINT whose KeyboardInterrupt is then lost (``lose``, as one raised inside
    a fork hook while DataLoader workers start: "Exception ignored in ...")."""

    def __init__(self, category: str, how: str = "raise") -> None:
        self.category, self.how = category, how

    def _at(self, trainer: L.Trainer, *args) -> None:
        if trainer.datamodule.category != self.category:
            return
        if self.how == "raise":
            raise KeyboardInterrupt
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)  # the handler runs in the main thread at the next check: here
        except KeyboardInterrupt:
            pass

    on_train_batch_start = on_test_batch_start = _at


def _args(root: Path, weights: Path, results_dir: Path, *extra: str, command: str = "test") -> list[str]:
    return [
        command,
        "--data.root", str(root),
        "--data.categories", f"[{','.join(CATEGORIES)}]",
        "--data.num_workers", "2",  # worker processes start in every category
        "--data.batch_size", "2",
        "--model.model_paths", f"[{FIXTURE / 'model'}]",
        "--model.backbone_weights", str(weights),
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--results_dir", str(results_dir),
        *extra,
    ]


def _callback(category: str, how: str) -> list[str]:
    spec = {"class_path": f"{__name__}.InterruptAt", "init_args": {"category": category, "how": how}}
    return ["--trainer.callbacks+", json.dumps(spec)]


@pytest.fixture(scope="module")
def full(tmp_path_factory, resnet18_weights):
    """The data, and the results of the uninterrupted run."""
    base = tmp_path_factory.mktemp("interrupts")
    root = make_mvtec_tree(base / "data", categories=CATEGORIES, size=64, n_train=2, n_good=2, n_per_defect=2)
    main(_args(root, resnet18_weights, base / "full"))
    return root, read_results(base / "full" / "results.csv")


def _interrupted(capsys, args: list[str]) -> tuple[int, str]:
    """``main(args)`` in this process, which must end with SystemExit: its exit code and its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def _resume_completes(root: Path, weights: Path, results_dir: Path, expected: dict) -> None:
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "lightning_cli.py"), *_args(root, weights, results_dir, "--resume", "true")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping dataset [mvtec_c1] (1/3): already in results.csv" in resumed.stderr
    assert read_results(results_dir / "results.csv") == expected


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_category_ends_with_the_resume_line(full, resnet18_weights, tmp_path, signum):
    root, expected = full
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "lightning_cli.py"), *_args(root, resnet18_weights, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    seen = []
    for line in proc.stderr:  # the signal follows the line at once: the category's workers are starting
        seen.append(line)
        if "Evaluating dataset [mvtec_c2] (2/3)" in line:
            proc.send_signal(signum)
            break
    err = "".join(seen) + proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert (f"interrupted by {name} in mvtec_c2 (2/3): {out / 'results.csv'} holds mvtec_c1 (1 of 3 categories); "
            f"rerun the same command with --resume true to compute the rest") in err, err
    assert err.rstrip().endswith("to compute the rest"), err
    assert "Traceback" not in err
    kept = read_results(out / "results.csv")
    assert set(kept) == {"mvtec_c1", "mean"} and kept["mvtec_c1"] == expected["mvtec_c1"]
    assert not list(out.glob(".*.tmp"))
    _resume_completes(root, resnet18_weights, out, expected)


def test_a_keyboard_interrupt_lightning_catches_ends_with_130(full, resnet18_weights, tmp_path, capsys):
    """Lightning catches KeyboardInterrupt and exits 1; the run still ends as an interrupt."""
    root, expected = full
    out = tmp_path / "out"
    code, err = _interrupted(capsys, _args(root, resnet18_weights, out, *_callback("c3", "raise")))
    assert code == 130, err
    assert f"interrupted by SIGINT in mvtec_c3 (3/3): {out / 'results.csv'} holds mvtec_c1, mvtec_c2 (2 of 3" in err
    assert set(read_results(out / "results.csv")) == {"mvtec_c1", "mvtec_c2", "mean"}


def test_a_signal_whose_keyboard_interrupt_is_lost_still_ends_the_run(full, resnet18_weights, tmp_path, capsys):
    root, expected = full
    out = tmp_path / "out"
    code, err = _interrupted(capsys, _args(root, resnet18_weights, out, *_callback("c2", "lose")))
    assert code == 130, err
    assert "interrupted by SIGINT in mvtec_c2 (2/3)" in err
    assert set(read_results(out / "results.csv")) == {"mvtec_c1", "mean"}
    _resume_completes(root, resnet18_weights, out, expected)


def test_an_interrupted_fit_names_the_models_built_and_the_rest(full, resnet18_weights, tmp_path, capsys):
    root, _ = full
    out = tmp_path / "out"
    fit = ["--model.backbones", "[resnet18]", "--model.pretrain_embed_dimension", "96",
           "--model.target_embed_dimension", "64", "--model.percentage", "0.2", "--model.model_paths", "null"]
    code, err = _interrupted(capsys, _args(root, resnet18_weights, out, *fit, *_callback("c2", "raise"), command="fit"))
    assert code == 130, err
    assert (f"interrupted by SIGINT in mvtec_c2 (2/3): {out / 'models'} holds the finished models of mvtec_c1; "
            f"build the rest with --data.categories '[\"c2\", \"c3\"]'") in err, err
    assert sorted(p.name for p in (out / "models").iterdir()) == ["mvtec_c1"]


def test_a_half_built_loader_prints_nothing_after_the_interrupt_line():
    """A signal that lands while a DataLoader starts its workers leaves an iterator without
    ``_workers``, whose ``__del__`` would print an AttributeError traceback after the resume line;
    after an interrupt that one report is dropped, and any other still reaches stderr."""
    script = (
        "import torch.utils.data.dataloader as d\n"
        "from patchcore_lightning.cli import _ignore_half_built_loaders\n"
        "_ignore_half_built_loaders()\n"
        "half = d._MultiProcessingDataLoaderIter.__new__(d._MultiProcessingDataLoaderIter)\n"
        "del half\n"
        "class Other:\n"
        "    def __del__(self):\n"
        "        raise ValueError('another report')\n"
        "other = Other()\n"
        "del other\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "_MultiProcessingDataLoaderIter" not in proc.stderr and "AttributeError" not in proc.stderr, proc.stderr
    assert "ValueError: another report" in proc.stderr, proc.stderr
