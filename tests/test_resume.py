"""An interrupted run keeps its finished categories; --resume completes it to the uninterrupted result."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patchcore_lightning.cli import main
from patchcore_lightning.reporting import read_results

from .conftest import FIXTURE, make_mvtec_tree

ROOT = Path(__file__).parent.parent


def _args(root, weights, results_dir, *extra) -> list[str]:
    return [
        "test",
        "--data.root", str(root),
        "--data.categories", "[c1,c2,c3]",
        "--data.num_workers", "0",
        "--model.model_paths", f"[{FIXTURE / 'model'}]",
        "--model.backbone_weights", str(weights),
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--results_dir", str(results_dir),
        *extra,
    ]


@pytest.mark.kernels
def test_sigterm_between_categories_then_resume(tmp_path, resnet18_weights):
    root = make_mvtec_tree(tmp_path / "data", categories=("c1", "c2", "c3"), size=96, n_good=4, n_per_defect=3)
    main(_args(root, resnet18_weights, tmp_path / "full"))
    full = read_results(tmp_path / "full" / "results.csv")

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "lightning_cli.py"), *_args(root, resnet18_weights, interrupted)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    results = interrupted / "results.csv"
    deadline = time.time() + 300
    while not (results.is_file() and "mvtec_c1" in results.read_text()) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    kept = read_results(results)
    assert "mvtec_c3" not in kept and kept["mvtec_c1"] == full["mvtec_c1"]  # whole rows, nothing half-written
    assert not list(interrupted.glob(".*.tmp"))

    resumed = subprocess.run(
        [sys.executable, str(ROOT / "lightning_cli.py"), *_args(root, resnet18_weights, interrupted, "--resume", "true")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping dataset [mvtec_c1] (1/3): already in results.csv" in resumed.stderr
    assert read_results(results) == full


def test_resume_refuses_to_mix_configurations(tmp_path, resnet18_weights, capsys):
    root = make_mvtec_tree(tmp_path / "data", categories=("c1", "c2", "c3"), size=96)
    main(_args(root, resnet18_weights, tmp_path / "r"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(_args(root, resnet18_weights, tmp_path / "r", "--resume", "true", "--data.resize", "240"))
    assert exit_info.value.code == 2
    assert "holds mvtec_c1 computed with other models, data or settings" in capsys.readouterr().err
    (tmp_path / "r" / "results_config.json").unlink()
    with pytest.raises(SystemExit):
        main(_args(root, resnet18_weights, tmp_path / "r", "--resume", "true"))
    assert "no readable results_config.json" in capsys.readouterr().err
