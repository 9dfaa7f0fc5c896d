"""predict against the exported model on ONNX Runtime (and OpenVINO), same images, same machine; and
the search's memory on a 200,000-row bank.

    python benchmarks/bench_export.py                  # speed: predict vs runtime, batch 1 and 8, 3 rounds
    python benchmarks/bench_export.py --memory         # also: peak RSS of a 200,000-row bank, chunked and not

Speed:
1. Data and model as ``bench_eval.py`` makes them, smaller: a synthetic MVTec-format category of
   1024² PNGs (20 train, 48 test images), a WideResNet50 model fitted on it (layer2+layer3, a
   4,704 × 1024 bank, the size of an IM224_WR50 bank; seeded random weights from a ``torch.save``
   file), 224² crops of 256. Exported by each run with ``lightning_cli.py export --export.format openvino``.
2. Rounds: in each round, for batch 1 and 8: ``lightning_cli.py predict`` on the test images (CPU,
   2 DataLoader workers, logger off) and ``deploy/patchcore_onnx.py`` on the same folder with ONNX
   Runtime and with OpenVINO (f32, the IR), each in a child process, alternating. Per run: wall
   time, the scoring time (first batch to the end of the last: predict's loop; the runtime's loop
   with its PIL decoding), images/s of both, and the child's peak RSS (VmHWM for the runtime; the
   CLI's ru_maxrss and its largest worker's). Medians over the rounds.

Memory (``--memory``): the fixture-style resnet18 model (D = 1024, 28 × 28 patches at 224²) with a
200,000-row synthetic bank, exported chunked (the default) and as one block (the search without
its Loop, the whole bank in one distance block), each scored at batch 1 in a fresh process:
peak RSS (VmHWM) and the files' size.

The parent process never imports torch (its peak would be carried into the children's ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from cli_timing import run_cli  # noqa: E402  (this folder)

DEPLOY = ROOT / "deploy" / "patchcore_onnx.py"

_RUNTIME = """
import json, sys, time, runpy
start = time.perf_counter()
out = sys.argv[1]
sys.argv = sys.argv[2:]
import importlib.util
spec = importlib.util.spec_from_file_location("patchcore_onnx", sys.argv[0])
deploy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy)
args = sys.argv[1:]
opt = dict(zip(args[::2], args[1::2]))
runtime = deploy.Runtime(opt["--model"], opt["--runtime"], opt.get("--graph", "auto"))
loaded = time.perf_counter()
rows = deploy.score_folder(runtime, deploy.Path(opt["--images"]), deploy.Path(opt["--out"]), int(opt["--batch-size"]))
end = time.perf_counter()
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
json.dump({"load_s": loaded - start, "score_s": end - loaded, "end": end - start, "peak_rss_mib": peak / 1024,
           "images": sum("error" not in r for r in rows)}, open(out, "w"))
"""


def _python(code: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def prepare(workdir: Path) -> tuple[Path, Path, Path, Path]:
    """Data, weights and model folder (made once under ``workdir``) and the export folder (made anew), in
    child processes."""
    root = workdir / "data_1024px_20train_48test"
    weights = workdir / "weights" / "wide_resnet50_2-random-seed0.pth"
    _python(
        "import sys, torch; from pathlib import Path\n"
        "from patchcore_lightning.data.synthetic import make_synthetic_mvtec\n"
        "from patchcore_lightning.backbones import load_backbone\n"
        "make_synthetic_mvtec(sys.argv[1], ('weave',), 1024, 20, 12, 12)\n"
        "w = Path(sys.argv[2])\n"
        "if not w.is_file():\n"
        "    w.parent.mkdir(parents=True, exist_ok=True); torch.save(load_backbone('wideresnet50', 'random')[0].state_dict(), w)\n",
        str(root), str(weights),
    )
    out = workdir / "fit_224_4704"
    model = out / "models" / "mvtec_weave"
    common = ["--data.root", str(root), "--data.categories", "[weave]", "--data.resize", "256", "--data.imagesize", "224",
              "--model.backbone_weights", str(weights), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false"]
    if not (model / "patchcore_lightning.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "lightning_cli.py"), "fit", *common, "--model.percentage",
                        repr(4704 / (20 * 28 * 28)), "--results_dir", str(out)], check=True, capture_output=True, text=True)
    export = out / "export" / "mvtec_weave"
    # exported on every run: a graph exported by other code would be measured in its place
    shutil.rmtree(export, ignore_errors=True)
    subprocess.run([sys.executable, str(ROOT / "lightning_cli.py"), "export", *common, "--model.model_paths",
                    f"[{model}]", "--export.format", "openvino", "--results_dir", str(out)],
                   check=True, capture_output=True, text=True)
    return root / "weave" / "test", weights, model, export


def run_predict(images: Path, model: Path, weights: Path, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        m = run_cli(ROOT, ["predict", "--data.predict_dir", str(images), "--data.resize", "256", "--data.imagesize", "224",
                           "--data.batch_size", str(batch), "--data.num_workers", "2", "--model.model_paths", f"[{model}]",
                           "--model.backbone_weights", str(weights), "--trainer.accelerator", "cpu",
                           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--results_dir", tmp])
    n = sum(1 for p in images.rglob("*.png"))
    score_s = m["marks"]["predict_last_batch"] - m["marks"]["predict_first_batch"]
    return {"wall_s": m["wall_s"], "score_s": score_s, "images_per_s": n / score_s, "wall_images_per_s": n / m["wall_s"],
            "peak_rss_mib": m["peak_rss_mib"], "workers_peak_rss_mib": m["workers_peak_rss_mib"]}


def run_runtime(images: Path, export: Path, batch: int, runtime: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        usage = Path(tmp) / "usage.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _RUNTIME, str(usage), str(DEPLOY), "--model", str(export), "--images",
                        str(images), "--out", tmp, "--batch-size", str(batch), "--runtime", runtime], check=True)
        wall = time.perf_counter() - start
        m = json.loads(usage.read_text())
    return {"wall_s": wall, "score_s": m["score_s"], "images_per_s": m["images"] / m["score_s"],
            "wall_images_per_s": m["images"] / wall, "peak_rss_mib": m["peak_rss_mib"], "load_s": m["load_s"]}


_BIG = """
import sys, torch
from patchcore_lightning import export as ex
from patchcore_lightning.memory_bank import MemoryBank
from patchcore_lightning.model import Backbones, PatchCore
out, weights, one_block = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
torch.manual_seed(0)
backbones = Backbones(weights)
fixture = PatchCore.from_folder("tests/fixtures/original_resnet18_weave/model", 224, backbones)
model = PatchCore(fixture.params, list(fixture.extractors), [MemoryBank(torch.randn(200_000, 1024))])
if one_block:  # the search as one (B*N, R) block, without the Loop: what the chunking avoids
    ex._chunk_rows = lambda n_queries, dim, rows, k, block_bytes: rows
ex.export_model(model, out, 256, backbones.sha256)
"""

_ONE_IMAGE = """
import importlib.util, json, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("patchcore_onnx", sys.argv[1])
deploy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy)
runtime = deploy.Runtime(sys.argv[2], "onnxruntime", "onnx")
loaded = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
images = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
start = time.perf_counter(); runtime(images); seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"after_load_mib": loaded / 1024, "peak_rss_mib": peak / 1024, "seconds": seconds}))
"""


def memory(workdir: Path) -> dict:
    weights = workdir / "weights" / "resnet18-seed0.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    _python("import sys, torch, torchvision; torch.manual_seed(0); "
            "torch.save(torchvision.models.resnet18(weights=None).state_dict(), sys.argv[1])", str(weights))
    figures = {}
    for name, one_block in (("chunked (default)", "0"), ("one block", "1")):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            _python(_BIG, tmp, str(weights), one_block)
            files = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
            proc = subprocess.run([sys.executable, "-c", _ONE_IMAGE, str(DEPLOY), tmp], check=True,
                                  capture_output=True, text=True)
            figures[name] = {"files_mib": files, **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(name, json.dumps(figures[name]), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_export", help="generated data, weights, model and export (reused)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also the 200,000-row bank's peak RSS")
    parser.add_argument("--no-speed", action="store_true", help="skip predict vs runtime")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    if not args.no_speed:
        images, weights, model, export = prepare(workdir)
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.repeats):
            for batch in (1, 8):
                for name, run in (("predict", lambda: run_predict(images, model, weights, batch)),
                                  ("onnxruntime", lambda: run_runtime(images, export, batch, "onnxruntime")),
                                  ("openvino f32 (IR)", lambda: run_runtime(images, export, batch, "openvino"))):
                    figures = run()
                    runs.setdefault((name, batch), []).append(figures)
                    print(f"round {r + 1} batch {batch} {name}: {json.dumps({k: round(v, 2) for k, v in figures.items()})}",
                          flush=True)
        print("\n| batch | scorer | images/s (scoring) | images/s (wall) | wall s | peak RSS MiB | vs predict (scoring) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for batch in (1, 8):
            base = statistics.median(f["images_per_s"] for f in runs[("predict", batch)])
            for name in ("predict", "onnxruntime", "openvino f32 (IR)"):
                fs = runs[(name, batch)]
                med = {k: statistics.median(f[k] for f in fs) for k in fs[0]}
                peak = f"{med['peak_rss_mib']:.0f}" + (f" (+ worker {med['workers_peak_rss_mib']:.0f})"
                                                        if "workers_peak_rss_mib" in med else "")
                print(f"| {batch} | {name} | {med['images_per_s']:.2f} | {med['wall_images_per_s']:.2f} | "
                      f"{med['wall_s']:.1f} | {peak} | {med['images_per_s'] / base:.2f}x |")
        report["speed"] = {f"{name} batch {batch}": fs for (name, batch), fs in runs.items()}
    if args.memory:
        report["memory"] = memory(workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
