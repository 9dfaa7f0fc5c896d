"""GPU check: the same models evaluated on the CPU and on a GPU give the same results.csv.

    python benchmarks/gpu_equivalence.py --workdir /tmp/gpu_check

Builds random-weight WideResNet50 models for two synthetic categories on the CPU, then evaluates
them on the CPU, on the GPU (``knn_backend auto``: the torch search on the GPU with a CPU-only
faiss), on the GPU with ``knn_backend faiss`` (with a CPU-only faiss build: the CPU index behind the
GPU, said once) and on the GPU with TF32 allowed, and prints the largest metric difference of each
GPU run from the CPU run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patchcore_lightning.data.synthetic import make_synthetic_mvtec  # noqa: E402
from patchcore_lightning.reporting import read_results  # noqa: E402


def cli(*args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "lightning_cli.py"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(args)}")
    where = [line for line in proc.stderr.splitlines() if "nearest-neighbour search" in line or "CPU-only faiss" in line]
    for line in where:
        print("  " + line.strip()[:160])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/gpu_check")
    args = parser.parse_args()
    work = Path(args.workdir)
    data = make_synthetic_mvtec(work / "data", ("tiles", "weave"))
    common = [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.root", str(data), "--data.synthetic", "false", "--data.categories", "[tiles,weave]",
        "--model.backbone_weights", "random", "--trainer.logger", "false",
    ]
    print(f"fit on cpu: {cli('fit', *common, '--trainer.accelerator', 'cpu', '--results_dir', str(work / 'fit')):.1f} s")
    models = f"[{work / 'fit/models/mvtec_tiles'},{work / 'fit/models/mvtec_weave'}]"
    runs = {
        "cpu": ["--trainer.accelerator", "cpu"],
        "gpu": ["--trainer.accelerator", "gpu"],
        "gpu+faiss": ["--trainer.accelerator", "gpu", "--model.knn_backend", "faiss"],
        "gpu+tf32": ["--trainer.accelerator", "gpu", "--model.allow_tf32", "true"],
    }
    tables = {}
    for name, extra in runs.items():
        seconds = cli("test", *common, "--model.model_paths", models, *extra, "--results_dir", str(work / name))
        tables[name] = read_results(work / name / "results.csv")
        print(f"test on {name}: {seconds:.1f} s  mean {tables[name]['mean']}")
    for name in ("gpu", "gpu+faiss", "gpu+tf32"):
        diff = max(
            abs(tables[name][row][metric] - tables["cpu"][row][metric])
            for row in tables["cpu"]
            for metric in tables["cpu"][row]
        )
        print(f"max |{name} - cpu| over all metrics: {diff:.3g}")


if __name__ == "__main__":
    main()
