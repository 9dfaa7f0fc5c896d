"""The GPU path end to end, and its floors, in one run (a few minutes on one H200 with 16 cores).

    python benchmarks/bench_gpu.py --json /tmp/bench_gpu.json
    python benchmarks/bench_gpu.py --device cpu --quick          # the script's own check, anywhere

1. Data: a synthetic MVTec-format category of 1024² PNGs (MVTec AD's size), 200 training and 200
   test images (30 % of the test images with drawn defects and masks), generated in parallel under
   ``--workdir`` and reused; seeded random WideResNet50 weights saved once with ``torch.save``.
2. ``fit`` at 224² (10 %, as IM224_WR50) and at 320² (1 %, as IM320_WR50), as a user runs it
   (``lightning_cli.py fit`` in a child process, default batch size and workers for the device);
   for 320²: the embedding seconds (the training epoch) and the coreset seconds (the end of the
   epoch to the banks), and the peak GPU memory.
3. ``test`` at 224² and 320² the same way: the test loop's images/s (first batch start to last
   batch end), the whole process's wall time, the peak GPU memory (``max_memory_allocated``).
4. The floors, in this process, for each size: decoding and transforms alone through the same
   DataLoader (the CLI's batch size, workers and pinned memory, batches copied to the device), and
   the model alone (backbone, patch features, kNN, blur) on a batch already on the device.
5. Equivalence on a small category (the demo's, 192² images), TF32 off: ``test`` on the CPU and on the
   device, the largest metric difference; and the raw image scores of the device's search (the
   torch search on a GPU with faiss-cpu) against faiss on the CPU, the largest relative difference.

The device gets the model's defaults: knn_backend auto, TF32 off, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli_timing import run_cli  # noqa: E402  (this folder)

from patchcore_lightning.data.datamodule import ShardBatches, loader_settings  # noqa: E402
from patchcore_lightning.data.mvtec import MVTecDataset, list_samples  # noqa: E402
from patchcore_lightning.data.synthetic import make_synthetic_mvtec  # noqa: E402
from patchcore_lightning.model import Backbones, PatchCore  # noqa: E402
from patchcore_lightning.reporting import read_results  # noqa: E402

SIZES = {224: (256, 0.1), 320: (366, 0.01)}  # imagesize: (resize, coreset percentage)


# --------------------------------------------------------------------------- data
def _image(args: tuple[Path, int, int, bool]) -> None:
    """One 1024² image (and its mask for a defect), from its own seed."""
    from PIL import Image

    from patchcore_lightning.data import synthetic

    path, seed, size, defect = args
    rng = np.random.default_rng(seed)
    image = synthetic._texture("weave", rng, size)
    if defect:
        image, mask = synthetic._defect(("hole", "scratch", "stain")[seed % 3], image, rng)
        mask_path = path.parent.parent.parent / "ground_truth" / "defect" / f"{path.stem}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)).save(path)


def make_category(root: Path, n_train: int, n_test: int, size: int) -> Path:
    """``<root>/weave`` with n_train training images and n_test test images (30 % defects); made once."""
    done = root / "weave" / ".complete"
    if done.is_file():
        return root
    jobs = [(root / "weave" / "train" / "good" / f"{i:03d}.png", i, size, False) for i in range(n_train)]
    n_bad = int(0.3 * n_test)
    jobs += [(root / "weave" / "test" / "good" / f"{i:03d}.png", 10_000 + i, size, False) for i in range(n_test - n_bad)]
    jobs += [(root / "weave" / "test" / "defect" / f"{i:03d}.png", 20_000 + i, size, True) for i in range(n_bad)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_image, jobs, chunksize=4))
    done.write_text("")
    return root


def weights_file(workdir: Path) -> Path:
    from patchcore_lightning.backbones import load_backbone

    path = workdir / "weights" / "wide_resnet50_2-random-seed0.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(load_backbone("wideresnet50", "random")[0].state_dict(), path)
    return path


# --------------------------------------------------------------------------- the CLI, as users run it
def _common(root: Path, imagesize: int, weights: Path, accelerator: str) -> list[str]:
    return ["--data.root", str(root), "--data.categories", "[weave]", "--data.resize", str(SIZES[imagesize][0]),
            "--data.imagesize", str(imagesize), "--model.backbone_weights", str(weights),
            "--trainer.accelerator", accelerator, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def fit(root: Path, imagesize: int, weights: Path, accelerator: str, out: Path) -> dict:
    m = run_cli(ROOT, ["fit", *_common(root, imagesize, weights, accelerator),
                       "--model.percentage", str(SIZES[imagesize][1]), "--results_dir", str(out)])
    marks = m["marks"]
    return {"wall_s": m["wall_s"], "embedding_s": marks["fit_features_done"] - marks["fit_epoch_start"],
            "coreset_s": marks["fit_banks_done"] - marks["fit_features_done"],
            "gpu_peak_allocated_mib": m["gpu_peak_allocated_mib"], "model": str(out / "models" / "mvtec_weave")}


def test(root: Path, imagesize: int, weights: Path, accelerator: str, model: str, n_test: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        m = run_cli(ROOT, ["test", *_common(root, imagesize, weights, accelerator),
                           "--model.model_paths", f"[{model}]", "--results_dir", tmp])
        metrics = read_results(Path(tmp) / "results.csv")["mvtec_weave"]
    loop = m["marks"]["test_last_batch"] - m["marks"]["test_first_batch"]
    where = [line.split(": ", 1)[-1] for line in m["stderr"].splitlines() if "nearest-neighbour search" in line]
    return {"wall_s": m["wall_s"], "loop_s": loop, "images_per_s": n_test / loop,
            "gpu_peak_allocated_mib": m["gpu_peak_allocated_mib"], "search": where[0] if where else None,
            "metrics": metrics}


# --------------------------------------------------------------------------- floors, in this process
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_floor(root: Path, imagesize: int, device: torch.device, passes: int) -> float:
    """Images/s of the test DataLoader alone, as the CLI builds it, its batches copied to the device."""
    dataset = MVTecDataset(list_samples(root, "weave"), SIZES[imagesize][0], imagesize)
    batch_size, workers = loader_settings(None, None, device.type)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=ShardBatches(len(dataset), batch_size),
                                         num_workers=workers, pin_memory=device.type == "cuda")
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for images, *_ in loader:
            images.to(device, non_blocking=True)
        _sync(device)
        rates.append(len(dataset) / (time.perf_counter() - start))
    return statistics.median(rates)


@torch.inference_mode()
def model_floor(model: PatchCore, imagesize: int, device: torch.device, repeats: int) -> float:
    """Images/s of the model alone (backbone, patch features, kNN, blur) on a batch on the device."""
    batch_size, _ = loader_settings(None, None, device.type)
    images = torch.randn(batch_size, 3, imagesize, imagesize, generator=torch.Generator().manual_seed(0)).to(device)
    model(images)  # warm-up: cuDNN plans, the search's caches
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(images)
        _sync(device)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


@torch.inference_mode()
def search_difference(model_path: str, root: Path, weights: Path, device: torch.device) -> float:
    """Largest relative difference of the raw image scores: the device's search against faiss on the CPU."""
    dataset = MVTecDataset(list_samples(root, "weave"), 160, 144)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    backbones = Backbones(str(weights))
    cpu = PatchCore.from_folder(model_path, 144, backbones, "faiss", allow_other_weights=True)
    expected = torch.cat([cpu(batch)[0] for batch in images.split(8)])
    on_device = PatchCore.from_folder(model_path, 144, Backbones(str(weights)), "auto", allow_other_weights=True)
    on_device.to(device)
    got = torch.cat([on_device(batch.to(device))[0].cpu() for batch in images.split(8)])
    return float(((got - expected).abs() / expected.abs()).max())


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_gpu", help="generated data and weights (reused)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a check of the script)")
    parser.add_argument("--quick", action="store_true", help="20 + 20 images of 256²: a check of the script")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    workdir = Path(args.workdir)
    n_train, n_test, side = (20, 20, 256) if args.quick else (200, 200, 1024)
    start = time.perf_counter()
    root = make_category(workdir / f"data_{side}px_{n_train}_{n_test}", n_train, n_test, side)
    weights = weights_file(workdir)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "data_s": time.perf_counter() - start,
                 "sizes": {}}
    print(f"data ready in {out['data_s']:.0f} s ({n_train} train, {n_test} test, {side}² PNGs)", flush=True)
    for imagesize in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            fitted = fit(root, imagesize, weights, accelerator, Path(tmp))
            tested = test(root, imagesize, weights, accelerator, fitted["model"], n_test)
            model = PatchCore.from_folder(fitted["model"], imagesize, Backbones(str(weights))).to(device)
            floors = {"decode_images_per_s": decode_floor(root, imagesize, device, passes=3),
                      "model_images_per_s": model_floor(model, imagesize, device, repeats=10)}
            del model
        entry = {"fit": fitted, "test": tested, **floors,
                 "loop_vs_slower_floor": tested["images_per_s"] / min(floors.values())}
        entry["fit"].pop("model")
        out["sizes"][imagesize] = entry
        print(f"{imagesize}²: test loop {tested['images_per_s']:.0f} images/s (wall {tested['wall_s']:.1f} s, "
              f"GPU peak {tested['gpu_peak_allocated_mib'] or 0:.0f} MiB, {tested['search']}); floors: decode "
              f"{floors['decode_images_per_s']:.0f}, model {floors['model_images_per_s']:.0f} images/s; "
              f"loop / slower floor {entry['loop_vs_slower_floor']:.2f}; fit: embedding {fitted['embedding_s']:.1f} s, "
              f"coreset {fitted['coreset_s']:.1f} s, GPU peak {fitted['gpu_peak_allocated_mib'] or 0:.0f} MiB",
              flush=True)
    # equivalence on the demo's small category: CPU against the device
    small = make_synthetic_mvtec(workdir / "small", ("weave",))
    demo = ["--config", str(ROOT / "configs" / "demo.yaml"), "--data.root", str(small), "--data.synthetic", "false",
            "--data.categories", "[weave]", "--model.backbone_weights", str(weights), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false"]
    with tempfile.TemporaryDirectory() as tmp:
        run_cli(ROOT, ["fit", *demo, "--trainer.accelerator", "cpu", "--results_dir", tmp])
        model_path = str(Path(tmp) / "models" / "mvtec_weave")
        tables = {}
        for name, accel in (("cpu", "cpu"), ("device", accelerator)):
            run_cli(ROOT, ["test", *demo, "--model.model_paths", f"[{model_path}]", "--trainer.accelerator", accel,
                           "--results_dir", f"{tmp}/{name}"])
            tables[name] = read_results(Path(tmp) / name / "results.csv")["mvtec_weave"]
        out["equivalence"] = {
            "max_metric_difference": max(abs(tables["device"][k] - tables["cpu"][k]) for k in tables["cpu"]),
            "max_raw_score_relative_difference": search_difference(model_path, small, weights, device),
        }
    out["total_s"] = time.perf_counter() - start
    print(f"device vs CPU (TF32 off): largest metric difference {out['equivalence']['max_metric_difference']:.2g}, "
          f"raw image scores {out['equivalence']['max_raw_score_relative_difference']:.2g} relative; "
          f"whole benchmark {out['total_s']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
