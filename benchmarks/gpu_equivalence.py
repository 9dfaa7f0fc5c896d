"""GPU check: the same models evaluated on the CPU and on a GPU, each GPU setting's metrics held to
the bound its run's own rounding implies.

    python benchmarks/gpu_equivalence.py --workdir /tmp/gpu_check
    python benchmarks/gpu_equivalence.py --device cpu     # a check of the script, without a GPU

Builds random-weight WideResNet50 models (the demo's settings) for two synthetic categories on the
CPU, then evaluates them with ``lightning_cli.py test`` on the CPU and on the device in three
settings:

- ``gpu``: ``knn_backend auto`` (the torch search on the GPU with a CPU-only faiss);
- ``gpu+faiss``: ``knn_backend faiss`` (with a CPU-only faiss build: the CPU index behind the GPU);
- ``gpu+tf32``: TF32 allowed (``--model.allow_tf32 true``), whose convolutions round to 10 bits.

For each setting and category the same computation runs in this process on both sides
(tests/agreement.py: each side's patch features measured against a float64 forward of the same
network, the pairs and PRO-curve area such moves can reorder), at the CLI's batch size and device,
so with the CLI's kernels. Each metric's difference, results.csv's and this process's, must lie
within that bound: the script prints both and exits 1 where one does not. TF32's bound is wide
(its convolutions round their inputs to 10 bits), and it says by how much TF32 may move each metric
on these data; the search's products and the blur stay float32 under TF32 (precision.py), so the
bound's exact search and float32 blur hold.
With ``--device cpu`` every setting runs on the CPU (TF32 changes nothing there).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu import weights_file  # noqa: E402  (this folder)

from patchcore_lightning.data.synthetic import make_synthetic_mvtec  # noqa: E402
from patchcore_lightning.model import Backbones, PatchCore  # noqa: E402
from patchcore_lightning.precision import tf32  # noqa: E402
from patchcore_lightning.reporting import read_results  # noqa: E402
from tests.agreement import agreement_bounds, category_tensors, device_run, metrics_of  # noqa: E402
from tests.bounds import U  # noqa: E402

CATEGORIES = ("tiles", "weave")
# name: (the CLI's extra arguments, knn_backend, TF32)
SETTINGS = {
    "gpu": ([], "auto", False),
    "gpu+faiss": (["--model.knn_backend", "faiss"], "faiss", False),
    "gpu+tf32": (["--model.allow_tf32", "true"], "auto", True),
}


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/gpu_check")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a check of the script)")
    args = parser.parse_args()
    work = Path(args.workdir)
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    data = make_synthetic_mvtec(work / "data", CATEGORIES)
    weights = weights_file(work)
    demo = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())["data"]
    resize, imagesize, batch_size = demo["resize"], demo["imagesize"], demo["batch_size"]
    common = [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.root", str(data), "--data.synthetic", "false", "--data.categories", f"[{','.join(CATEGORIES)}]",
        "--model.backbone_weights", str(weights), "--trainer.logger", "false",
    ]
    print(f"fit on cpu: {cli('fit', *common, '--trainer.accelerator', 'cpu', '--results_dir', str(work / 'fit')):.1f} s")
    folders = {c: work / "fit" / "models" / f"mvtec_{c}" for c in CATEGORIES}
    models = f"[{','.join(str(folders[c]) for c in CATEGORIES)}]"
    tables = {}
    for name, extra in {"cpu": ["--trainer.accelerator", "cpu"],
                        **{s: ["--trainer.accelerator", accelerator, *a] for s, (a, _, _) in SETTINGS.items()}}.items():
        seconds = cli("test", *common, "--model.model_paths", models, *extra, "--results_dir", str(work / name))
        tables[name] = read_results(work / name / "results.csv")
        print(f"test on {name}: {seconds:.1f} s  mean {tables[name]['mean']}")

    failed = []
    for category in CATEGORIES:
        images, labels, masks = category_tensors(data, category, resize, imagesize)
        row = f"mvtec_{category}"
        with tf32(False):
            model = PatchCore.from_folder(folders[category], imagesize, Backbones(str(weights)))
            cpu = device_run(model, images, "cpu", batch_size)
        cpu_metrics = metrics_of(cpu, labels, masks)
        # the bound is this process's: it holds results.csv where the CLI ran the same kernels
        same = max(abs(v - tables["cpu"][row][k]) for k, v in cpu_metrics.items())
        print(f"{category}: this process's CPU metrics vs the CLI's results.csv: largest difference {same:.2g}")
        for name, (_, knn_backend, allow_tf32) in SETTINGS.items():
            model = PatchCore.from_folder(folders[category], imagesize, Backbones(str(weights)), knn_backend=knn_backend)
            with tf32(allow_tf32):  # the float64 forward that measures the features ignores TF32
                run = device_run(model, images, device, batch_size)
            bounds = agreement_bounds(cpu, run, model.cpu(), labels, masks)
            ours = metrics_of(run, labels, masks)
            print(f"{category}, {name}: features within {cpu.rounding / U:.3g} u (cpu) and {run.rounding / U:.3g} u "
                  f"({name}) of float64")
            for metric, bound in bounds.items():
                cli_diff = abs(tables[name][row][metric] - tables["cpu"][row][metric])
                diff = abs(ours[metric] - cpu_metrics[metric])
                ok = max(cli_diff, diff) <= bound
                print(f"  {metric}: |{name} - cpu| {diff:.2g} (CLI {cli_diff:.2g}), bound {bound:.2g}"
                      f"{'' if ok else '  <- past its bound'}")
                if not ok:
                    failed.append(f"{category} {name} {metric}")
    if failed:
        raise SystemExit(f"past their bounds: {', '.join(failed)}")
    print("every difference within its bound")


if __name__ == "__main__":
    main()
