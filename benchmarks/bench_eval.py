"""End-to-end evaluation on the CPU: ``lightning_cli.py test`` as a user runs it, timed and weighed.

    python benchmarks/bench_eval.py                          # this checkout, 3 rounds
    python benchmarks/bench_eval.py --trees ../old-checkout . --repeats 5   # checkouts side by side

1. Data: a synthetic MVTec-format category (``data.synthetic.make_synthetic_mvtec``), 1024² PNGs
   as MVTec AD's, 60 train and 150 test images, generated once under ``--workdir``.
2. Model: ``lightning_cli.py fit`` on its train split, WideResNet50 layer2+layer3, seeded random
   weights saved once with ``torch.save`` (timing does not depend on the values; ImageNet weights
   load the same way from the torch cache), the coreset percentage chosen for a bank of 4,704 x 1024
   rows, the size of an IM224_WR50 bank. Reused when present.
3. Rounds: in each of ``--repeats`` rounds, for every checkout in ``--trees``, ``lightning_cli.py test``
   runs in a child process twice, with the default TensorBoard logger and with
   ``--trainer.logger false`` (224², batch 2, 2 DataLoader workers, CPU). Per run: the process's
   wall time, the time from the first test batch to the end of the process (the evaluation: test
   loop, metrics, outputs), the peak RSS of the CLI process (``ru_maxrss``) and of its largest
   DataLoader worker, and the five metrics (every run must give the same ones). Runs of different
   checkouts alternate, so the machine's drift hits them alike; medians are reported.

Every run also reports the CPU time other processes took meanwhile (``/proc/stat``): figures taken
on a busy machine are not figures of this code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli_timing import run_cli  # noqa: E402  (this folder)


def _cpu_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent (user + nice + system), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(x) for x in fields[:3]) / os.sysconf("SC_CLK_TCK")


def prepare(args) -> tuple[Path, Path, Path]:
    """The data root, the model folder and the weights file (made once under ``--workdir``)."""
    import torch

    from patchcore_lightning.backbones import load_backbone
    from patchcore_lightning.data.synthetic import make_synthetic_mvtec

    workdir = Path(args.workdir)
    root = make_synthetic_mvtec(workdir / "data_1024px_60train_150test", ("weave",), 1024, 60, 30, 40)
    weights = workdir / "weights" / "wide_resnet50_2-random-seed0.pth"
    if not weights.is_file():
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(load_backbone("wideresnet50", "random")[0].state_dict(), weights)
    out = workdir / "fit_224_4704"
    model = out / "models" / "mvtec_weave"
    if not (model / "patchcore_lightning.json").is_file():
        percentage = 4704 / (60 * 28 * 28)
        cmd = [sys.executable, str(ROOT / "lightning_cli.py"), "fit", "--data.root", str(root),
               "--data.categories", "[weave]", "--model.backbone_weights", str(weights),
               "--model.percentage", repr(percentage), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--results_dir", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return root, model, weights


def run_test(tree: Path, argv: list[str]) -> dict:
    """One ``lightning_cli.py test`` of ``tree``: its figures, the CPU share others took, results.csv's row."""
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        busy, own = _cpu_busy_seconds(), os.times()
        m = run_cli(tree, [*argv, "--results_dir", str(results)])
        own_after = os.times()
        own_cpu = (own_after.children_user + own_after.children_system) - (own.children_user + own.children_system)
        row = (results / "results.csv").read_text().splitlines()[1].split(",")
    return {
        "wall_s": m["wall_s"],
        "evaluation_s": m["end"] - m["marks"]["test_first_batch"],
        "peak_rss_mib": m["peak_rss_mib"],
        "workers_peak_rss_mib": m["workers_peak_rss_mib"],
        "foreign_cpu_share": max(0.0, _cpu_busy_seconds() - busy - own_cpu) / (m["wall_s"] * (os.cpu_count() or 1)),
        "metrics": [float(x) for x in row[1:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_eval", help="generated data, weights and model (reused)")
    parser.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="checkouts whose CLI is timed")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs every checkout, logger on and off)")
    parser.add_argument("--json", help="also write every run's figures to this file")
    args = parser.parse_args()
    root, model, weights = prepare(args)
    argv = ["test", "--data.root", str(root), "--data.categories", "[weave]", "--data.resize", "256",
            "--data.imagesize", "224", "--data.batch_size", "2", "--data.num_workers", "2",
            "--model.model_paths", f"[{model}]", "--model.backbone_weights", str(weights),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    settings = {"tensorboard": [], "logger off": ["--trainer.logger", "false"]}
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeats):
        for tree in args.trees:
            for setting, extra in settings.items():
                m = run_test(tree.resolve(), [*argv, *extra])
                runs.setdefault((str(tree), setting), []).append(m)
                print(f"round {r + 1} {tree} [{setting}]: wall {m['wall_s']:.1f} s (evaluation {m['evaluation_s']:.1f} s), "
                      f"peak RSS {m['peak_rss_mib']:.0f} MiB (workers {m['workers_peak_rss_mib']:.0f} MiB), "
                      f"others used {100 * m['foreign_cpu_share']:.0f}% of the CPUs", flush=True)
    rows = [m["metrics"] for ms in runs.values() for m in ms]
    spread = max(max(abs(a - b) for a, b in zip(row, rows[0])) for row in rows)
    print("\nmetrics: " + ", ".join(f"{v:.6f}" for v in rows[0]) + f"; largest difference between runs {spread:.2g}")
    print(f"\n| checkout | logger | wall s | evaluation s | ms/img | peak RSS MiB | worker MiB |  (medians of {args.repeats})")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (tree, setting), ms in runs.items():
        med = {k: statistics.median(m[k] for m in ms) for k in ("wall_s", "evaluation_s", "peak_rss_mib", "workers_peak_rss_mib")}
        print(f"| {tree} | {setting} | {med['wall_s']:.1f} | {med['evaluation_s']:.1f} | "
              f"{1000 * med['evaluation_s'] / 150:.0f} | {med['peak_rss_mib']:.0f} | {med['workers_peak_rss_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{t} [{s}]": ms for (t, s), ms in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
