"""The GPU path as users run it, its floors timed the same way, and the GPU against the CPU, in one run.

    python benchmarks/bench_gpu.py --json /tmp/bench_gpu.json
    python benchmarks/bench_gpu.py --device cpu --quick          # the script's own check, anywhere

1. Data: a synthetic MVTec-format category of 1024² PNGs (MVTec AD's size), 256 training and 200
   test images (30 % of the test images with drawn defects and masks), generated in parallel under
   ``--workdir`` and reused; 5 categories of it (``weave`` and 4 links to it: 1,000 test images);
   seeded random WideResNet50 weights saved once with ``torch.save``.
2. 224² (IM224_WR50's settings): ``fit`` of ``weave`` at 10 % (a bank of 20,070 × 1024 rows, within
   MVTec AD's 16-31k at 224²), then ``test`` of the 5 categories with that model, twice: the CLI's
   default (TensorBoard on) and ``--trainer.logger false``. Each as a user runs it:
   ``lightning_cli.py`` in a child process, the device's default batch size and workers, the
   progress bar on. Reported: the test loop's images/s (per category from the moment Lightning
   asks for the DataLoader, so its workers' start and first batch included, to the last batch's
   end; summed over the categories), the whole process's wall time, the evaluation (first loader
   to the last category's outputs) and the peak GPU memory (``max_memory_allocated``).
3. The floors, in this process, timed like the loop: per category pass from the request of the
   loader (as the data module builds it: on a GPU ``ItemwiseLoader``, batch size, workers, pinned
   memory; workers started anew each pass) to the last batch, summed over 5 passes:
   - decoding and transforms alone, each batch copied to the device;
   - the model alone (backbone, patch features, kNN, blur) on batches of the same sizes already on
     the device, the first pass's warm-up (cuDNN plans, search caches) included as in the loop.
4. 320² (IM320_WR50's settings): ``fit`` of 200 training images at 1 % (embedding seconds: the
   training epoch; coreset seconds: the end of the epoch to the banks; peak GPU memory) and
   ``test`` of one category (TensorBoard on), with its floors.
5. GPU against CPU at 224², TF32 off: a model fitted on the device from 200 training images;
   ``test`` of 60 of the test images on the CPU and on the device, each metric's difference held
   to its bound from the run's own data (tests/agreement.py: the model's float32 outputs on each
   side, at the CLI's batch size there, with each side's patch features measured against a float64
   forward; the pairs and the PRO-curve area that rounding allows): the script exits 1 where a
   difference passes its bound; and the search alone on the same patch features (extracted once on the device):
   the device's search (the torch search on a GPU with faiss-cpu) against faiss on the CPU, the
   largest relative difference of the nearest distances and the seconds per image of each.

The device gets the model's defaults: knn_backend auto, TF32 off, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
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

from patchcore_lightning.data.datamodule import ItemwiseLoader, ShardBatches, loader_settings  # noqa: E402
from patchcore_lightning.data.mvtec import MVTecDataset, list_samples  # noqa: E402
from patchcore_lightning.memory_bank import MemoryBank  # noqa: E402
from patchcore_lightning.model import Backbones, PatchCore  # noqa: E402
from patchcore_lightning.reporting import read_results  # noqa: E402
from tests.agreement import agreement_bounds, category_tensors, device_run, metrics_of  # noqa: E402
from tests.bounds import U  # noqa: E402

SIZES = {224: (256, 0.1), 320: (366, 0.01)}  # imagesize: (resize, coreset percentage)


# --------------------------------------------------------------------------- data
def _image(args: tuple[Path, int, int, bool]) -> None:
    """One image (and its mask for a defect), from its own seed."""
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


def linked_categories(root: Path, n: int) -> list[str]:
    """``weave`` and n - 1 links to it (``weave_2``, ...): n categories of the same images."""
    names = ["weave"]
    for i in range(2, n + 1):
        link = root / f"weave_{i}"
        if not link.exists():
            link.symlink_to("weave", target_is_directory=True)
        names.append(link.name)
    return names


def subset_category(root: Path, source: Path, n_train: int, n_good: int, n_defect: int) -> Path:
    """``<root>/weave``: links to the first n_train training images of ``source``'s weave, and to
    n_good good and n_defect defective test images (with their masks)."""
    target = root / "weave"
    if (target / ".complete").is_file():
        return root
    wanted = [("train/good", n_train), ("test/good", n_good), ("test/defect", n_defect)]
    for folder, n in wanted:
        for path in sorted((source / "weave" / folder).glob("*.png"))[:n]:
            link = target / folder / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
            if folder == "test/defect":
                mask = source / "weave" / "ground_truth" / "defect" / f"{path.stem}_mask.png"
                mask_link = target / "ground_truth" / "defect" / mask.name
                mask_link.parent.mkdir(parents=True, exist_ok=True)
                mask_link.symlink_to(mask.resolve())
    (target / ".complete").write_text("")
    return root


def weights_file(workdir: Path) -> Path:
    from patchcore_lightning.backbones import load_backbone

    path = workdir / "weights" / "wide_resnet50_2-random-seed0.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(load_backbone("wideresnet50", "random")[0].state_dict(), path)
    return path


# --------------------------------------------------------------------------- the CLI, as users run it
def _common(root: Path, categories: list[str], imagesize: int, weights: Path, accelerator: str) -> list[str]:
    return ["--data.root", str(root), "--data.categories", f"[{','.join(categories)}]",
            "--data.resize", str(SIZES[imagesize][0]), "--data.imagesize", str(imagesize),
            "--model.backbone_weights", str(weights), "--trainer.accelerator", accelerator]


def fit(root: Path, imagesize: int, weights: Path, accelerator: str, out: Path, percentage: float) -> dict:
    m = run_cli(ROOT, ["fit", *_common(root, ["weave"], imagesize, weights, accelerator), "--trainer.logger", "false",
                       "--model.percentage", str(percentage), "--results_dir", str(out)])
    marks = m["marks"]
    bank = [line for line in m["stderr"].splitlines() if "patch features" in line]
    return {"wall_s": m["wall_s"], "embedding_s": marks["fit_features_done"] - marks["fit_epoch_start"],
            "coreset_s": marks["fit_banks_done"] - marks["fit_features_done"], "bank": bank[-1] if bank else None,
            "gpu_peak_allocated_mib": m["gpu_peak_allocated_mib"], "model": str(out / "models" / "mvtec_weave")}


def test(root: Path, categories: list[str], imagesize: int, weights: Path, accelerator: str, model: str,
         n_images: int, logger: bool) -> dict:
    """``lightning_cli.py test`` of ``categories`` with one model folder; TensorBoard on (the default) or off."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["test", *_common(root, categories, imagesize, weights, accelerator), "--model.model_paths", f"[{model}]",
                "--results_dir", tmp, *([] if logger else ["--trainer.logger", "false"])]
        m = run_cli(ROOT, argv)
        metrics = read_results(Path(tmp) / "results.csv")[f"mvtec_{categories[0]}"]
    loop = m["sums"]["test_loop"]
    where = [line.split(": ", 1)[-1] for line in m["stderr"].splitlines() if "nearest-neighbour search" in line]
    return {"logger": "TensorBoard" if logger else "off", "wall_s": m["wall_s"], "loop_s": loop,
            "images_per_s": n_images / loop, "evaluation_s": m["marks"]["test_end"] - m["marks"]["test_loop_start"],
            "gpu_peak_allocated_mib": m["gpu_peak_allocated_mib"], "search": where[0] if where else None,
            "metrics": metrics}


# --------------------------------------------------------------------------- floors, in this process
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader(dataset: MVTecDataset, device: torch.device) -> torch.utils.data.DataLoader:
    """The test loader as the data module builds it for ``device`` (one process)."""
    batch_size, workers = loader_settings(None, None, device.type)
    loader = torch.utils.data.DataLoader if device.type == "cpu" else ItemwiseLoader
    return loader(dataset, batch_sampler=ShardBatches(len(dataset), batch_size), num_workers=workers,
                          pin_memory=device.type == "cuda")


def decode_floor(root: Path, imagesize: int, device: torch.device, passes: int) -> float:
    """Images/s of the test loader alone (workers started anew each pass), batches copied to the device."""
    dataset = MVTecDataset(list_samples(root, "weave"), SIZES[imagesize][0], imagesize)
    seconds = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        for images, *_ in _loader(dataset, device):
            images.to(device, non_blocking=True)
        _sync(device)
        seconds += time.perf_counter() - start
    return passes * len(dataset) / seconds


@torch.inference_mode()
def model_floor(model: PatchCore, n_images: int, imagesize: int, device: torch.device, passes: int) -> float:
    """Images/s of the model alone on batches of the loader's sizes already on the device, timed per
    pass like the loop (the first pass's warm-up included)."""
    batch_size, _ = loader_settings(None, None, device.type)
    images = torch.randn(batch_size, 3, imagesize, imagesize, generator=torch.Generator().manual_seed(0)).to(device)
    sizes = [len(batch) for batch in ShardBatches(n_images, batch_size).batches]
    seconds = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        for size in sizes:
            model(images[:size])
        _sync(device)
        seconds += time.perf_counter() - start
    return passes * n_images / seconds


def floors(root: Path, model_path: str, imagesize: int, weights: Path, device: torch.device, n_images: int,
           passes: int) -> dict:
    model = PatchCore.from_folder(model_path, imagesize, Backbones(str(weights))).to(device)
    out = {"decode_images_per_s": decode_floor(root, imagesize, device, passes),
           "model_images_per_s": model_floor(model, n_images, imagesize, device, passes)}
    del model
    return out


@torch.inference_mode()
def search_alone(model_path: str, root: Path, weights: Path, device: torch.device, n_images: int) -> dict:
    """The device's search (what ``knn_backend auto`` picks there) against faiss on the CPU, on the same
    patch features (extracted once on the device): largest relative difference of the nearest
    distances, seconds per image of each."""
    dataset = MVTecDataset(list_samples(root, "weave"), SIZES[224][0], 224)
    model = PatchCore.from_folder(model_path, 224, Backbones(str(weights))).to(device)
    k = model.params[0].anomaly_scorer_num_nn
    images = torch.stack([dataset[i][0] for i in range(min(n_images, len(dataset)))])
    features = [model.patch_features(batch.to(device), 0)[0] for batch in images.split(8)]  # (8*h*w, D) each
    vectors = model.banks[0].vectors
    banks = {"device": MemoryBank(vectors.to(device), "auto"), "faiss on the CPU": MemoryBank(vectors.cpu(), "faiss")}
    out, distances = {}, {}
    for name, bank in banks.items():
        bank.search(features[0][:8].to(bank.vectors.device), k)  # warm-up: the index, the norms
        _sync(device)
        start = time.perf_counter()
        distances[name] = torch.cat([bank.search(f.to(bank.vectors.device), k).cpu() for f in features])  # (N*h*w, k)
        _sync(device)
        out[f"{name} s/image"] = (time.perf_counter() - start) / len(images)
        out[f"{name} search"] = bank.describe()
    expected, got = distances["faiss on the CPU"], distances["device"]
    out["max_relative_difference"] = float(((got - expected).abs() / expected.abs().clamp_min(1e-12)).max())
    return out


def device_agreement(model_path: str, root: Path, weights: Path, device: torch.device) -> dict:
    """The model's float32 raw outputs of ``root``'s test images on the CPU and on ``device``, each at
    the CLI's batch size there (so the kernels of ``test``), each side's features measured against a
    float64 forward on ``device``; the five metrics of each and the most each may differ
    (tests/agreement.py)."""
    model = PatchCore.from_folder(model_path, 224, Backbones(str(weights)))
    images, labels, masks = category_tensors(root, "weave", SIZES[224][0], 224)
    runs = {}
    for name, where in (("cpu", torch.device("cpu")), ("device", device)):
        batch_size, _ = loader_settings(None, None, "cpu" if where.type == "cpu" else "gpu")
        runs[name] = device_run(model, images, where, batch_size, exact_device=device)
    bounds = agreement_bounds(runs["cpu"], runs["device"], model.cpu(), labels, masks)
    metrics = {name: metrics_of(run, labels, masks) for name, run in runs.items()}
    return {"feature_rounding_u": {name: run.rounding / U for name, run in runs.items()}, "metrics": metrics,
            "difference": {k: abs(metrics["device"][k] - metrics["cpu"][k]) for k in bounds}, "bound": bounds}


# --------------------------------------------------------------------------- main
def _mib(value: float | None) -> str:
    return "n/a (no GPU)" if value is None else f"{value:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_gpu", help="generated data and weights (reused)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a check of the script)")
    parser.add_argument("--quick", action="store_true", help="20 + 20 images of 256², 2 categories: a check of the script")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    workdir = Path(args.workdir)
    n_train, n_test, side, n_categories = (20, 20, 256, 2) if args.quick else (256, 200, 1024, 5)
    n_eq_train, n_eq_good, n_eq_defect = (16, 6, 4) if args.quick else (200, 42, 18)
    start = time.perf_counter()
    root = make_category(workdir / f"data_{side}px_{n_train}_{n_test}", n_train, n_test, side)
    categories = linked_categories(root, n_categories)
    weights = weights_file(workdir)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "data_s": time.perf_counter() - start}
    print(f"data ready in {out['data_s']:.0f} s ({n_train} train, {n_test} test {side}² PNGs; "
          f"{n_categories} categories: {n_categories * n_test} test images)", flush=True)

    # 224²: the default run (TensorBoard) and the logger off, on every category; the floors
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit(root, 224, weights, accelerator, Path(tmp), SIZES[224][1])
        runs = [test(root, categories, 224, weights, accelerator, fitted["model"], n_categories * n_test, logger)
                for logger in (True, False)]
        floor = floors(root, fitted["model"], 224, weights, device, n_test, n_categories)
    fitted.pop("model")
    out["224"] = {"fit": fitted, "test": runs, **floor}
    print(f"224²: fit {fitted['wall_s']:.1f} s ({fitted['bank']}); floors (images/s, {n_categories} passes): decode "
          f"{floor['decode_images_per_s']:.3g}, model {floor['model_images_per_s']:.3g}", flush=True)
    for run in runs:
        run["loop_vs_slower_floor"] = run["images_per_s"] / min(floor.values())
        print(f"224² test, logger {run['logger']}: {run['images_per_s']:.3g} images/s "
              f"({run['loop_vs_slower_floor']:.2f} of the slower floor), wall {run['wall_s']:.1f} s, evaluation "
              f"{run['evaluation_s']:.1f} s, GPU peak {_mib(run['gpu_peak_allocated_mib'])}; {run['search']}",
              flush=True)

    # 320²: fit at 1 % (200 training images), test of one category, floors
    eq_root = subset_category(workdir / f"eq_{side}px_{n_eq_train}", root, n_eq_train, n_eq_good, n_eq_defect)
    train200 = subset_category(workdir / f"train_{side}px_{n_eq_train}", root, n_eq_train, n_test - int(0.3 * n_test),
                               int(0.3 * n_test))
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit(train200, 320, weights, accelerator, Path(tmp), SIZES[320][1])
        run = test(root, ["weave"], 320, weights, accelerator, fitted["model"], n_test, True)
        floor = floors(root, fitted["model"], 320, weights, device, n_test, 1)
    fitted.pop("model")
    run["loop_vs_slower_floor"] = run["images_per_s"] / min(floor.values())
    out["320"] = {"fit": fitted, "test": run, **floor}
    print(f"320²: fit embedding {fitted['embedding_s']:.1f} s, coreset {fitted['coreset_s']:.1f} s, GPU peak "
          f"{_mib(fitted['gpu_peak_allocated_mib'])} ({fitted['bank']}); test {run['images_per_s']:.3g} images/s "
          f"({run['loop_vs_slower_floor']:.2f} of the slower floor: decode {floor['decode_images_per_s']:.3g}, model "
          f"{floor['model_images_per_s']:.3g}), wall {run['wall_s']:.1f} s, GPU peak "
          f"{_mib(run['gpu_peak_allocated_mib'])}", flush=True)

    # GPU against CPU at 224²: a model fitted on the device from 200 images; test on both; the search alone
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit(eq_root, 224, weights, accelerator, Path(tmp), SIZES[224][1])
        n_eq = n_eq_good + n_eq_defect
        tables = {name: test(eq_root, ["weave"], 224, weights, accel, fitted["model"], n_eq, False)["metrics"]
                  for name, accel in (("cpu", "cpu"), ("device", accelerator))}
        agreement = device_agreement(fitted["model"], eq_root, weights, device)
        search = search_alone(fitted["model"], eq_root, weights, device, 32)
    # the CLI's results.csv on each side, and the same computation in this process (whose features'
    # rounding is measured): both within the bound
    agreement["cli_difference"] = {k: abs(tables["device"][k] - tables["cpu"][k]) for k in tables["cpu"]}
    agreement["within_bound"] = all(
        max(agreement["difference"][k], agreement["cli_difference"][k]) <= bound for k, bound in agreement["bound"].items()
    )
    out["equivalence"] = {**agreement, "search": search, "bank": fitted["bank"]}
    out["total_s"] = time.perf_counter() - start
    rounding = agreement["feature_rounding_u"]
    print(f"device vs CPU at 224² (TF32 off, {n_eq_train} training images, {n_eq} test images): features within "
          f"{rounding['cpu']:.3g} u (CPU) and {rounding['device']:.3g} u (device) of float64", flush=True)
    for k, bound in agreement["bound"].items():
        print(f"  {k}: |device - cpu| {agreement['difference'][k]:.2g} (CLI {agreement['cli_difference'][k]:.2g}), "
              f"bound {bound:.2g}", flush=True)
    print(f"  every difference within its bound: {agreement['within_bound']}; search alone on the same features: "
          f"nearest distances {search['max_relative_difference']:.2g} relative, {search['device search']} "
          f"{1000 * search['device s/image']:.1f} ms/image, faiss on the CPU "
          f"{1000 * search['faiss on the CPU s/image']:.1f} ms/image; whole benchmark {out['total_s']:.0f} s",
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not agreement["within_bound"]:
        raise SystemExit("a metric of the device differs from the CPU's by more than its bound")


if __name__ == "__main__":
    main()
