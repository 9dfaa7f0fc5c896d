"""Evaluation speed: images/s, time per stage, the backbone and the kNN alone, peak RSS.

    python benchmarks/bench_eval.py                                   # CPU, 224², bank 4,704 x 1024
    python benchmarks/bench_eval.py --imagesize 320 --resize 366 --device cuda
    python benchmarks/bench_eval.py --data-root /data/mvtec --category bottle \\
        --model-path models/mvtec_bottle --weights null              # a real category and model

1. Data: a synthetic MVTec-format category (``make_synthetic_mvtec``: ``--n-train`` train images,
   ``--n-good`` + 3 x ``--n-per-defect`` test images, ``--disk-size`` pixels a side, PNG, as
   MVTec AD's 1024² by default), unless ``--data-root``/``--category`` are given.
2. Model: ``lightning_cli.py fit`` on its train split (WideResNet50 layer2+layer3, weights
   ``--weights``), the coreset percentage chosen so that the bank holds ``--bank-size`` rows,
   unless ``--model-path`` is given. Timing does not depend on the weights' values, memory does
   depend on where they come from: by default (``random-file``) they are seeded random values
   written once to ``<workdir>/weights/`` in torch.save's zip format and loaded from that file, as
   ImageNet weights are from the torch cache; ``random-legacy-file`` writes them in torch's legacy
   format, as torchvision's own ``wide_resnet50_2-95faca4d.pth`` is; ``random`` builds them from
   the seed in the process (no file); ``null`` is the ImageNet file; any other value a file.
3. ``stages`` (a child process): the test split through ``PatchCoreModule`` as Lightning's test loop
   drives it. ``--repeats`` passes call ``test_step`` and then the metric's ``compute`` (the real
   path: total, images/s), each starting as the CLI's test loop does, right after the free heap is
   handed back (``release_free_heap``, as ``load_members`` ends); then ``--staged-repeats`` passes
   that run ``member_outputs``' stages one by one, timed (data, backbone, aggregation, kNN,
   segmentation, metrics). The backbone alone and the kNN alone on one batch (``--micro-repeats``
   calls each) are timed right before and right after every real pass; the ratio total /
   (backbone + kNN) of a pass is over the mean of the two, and the printed ratio is the median of
   the passes' ratios (on the shared 2-core machine of the README single passes had a standard
   deviation of ~0.05, and the printed median one of 0.025 from run to run with 5 passes, 0.014 with
   the default 11). Medians throughout.
4. ``cli`` (a child process): ``lightning_cli.py test`` on the category, its wall time, the time of
   its test loop, and its peak RSS (``ru_maxrss`` of the process; DataLoader workers separately).

Every measurement also reports the CPU time other processes took meanwhile: figures taken on a
busy machine (OpenMP threads then wait for each other) are not figures of this code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV_KEEP_TRITON_HINT = "PATCHCORE_IMPORT_TRITON=1 or installed elsewhere: ~80 MiB more"

# The package, torch and Lightning are imported inside the functions: the parent process stays
# small, and every child's peak RSS is its own.


# --------------------------------------------------------------------------- measuring helpers
def _cpu_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent (user + nice + system), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return math.nan
    user, nice, system = (int(x) for x in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class _ForeignLoad:
    """CPU seconds other processes used while this one ran (reported, never subtracted)."""

    def __enter__(self):
        self.busy, self.own, self.wall = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = (_cpu_busy_seconds() - self.busy) - (_own_cpu_seconds() - self.own)
        self.share = max(0.0, self.seconds) / (max(time.perf_counter() - self.wall, 1e-9) * (os.cpu_count() or 1))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _peak_rss_mb() -> dict:
    """Peak RSS in MiB (ru_maxrss is in KiB on Linux) of this process and of its largest child."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": self_kb / 1024, "peak_rss_workers_mb": kids_kb / 1024}


# --------------------------------------------------------------------------- preparation (parent)
_RANDOM_FILES = {  # --weights → the file written under <workdir>/weights
    "random-file": "wide_resnet50_2-random-seed0.pth",
    "random-legacy-file": "wide_resnet50_2-random-seed0-legacy.pth",
}


def backbone_weights(args) -> str:
    """``--weights`` as ``--model.backbone_weights``: ``random``, ``null`` or a file, the random
    files written first where missing (seed 0, the values ``random`` gives)."""
    if args.weights not in _RANDOM_FILES:
        return args.weights
    path = Path(args.workdir) / "weights" / _RANDOM_FILES[args.weights]
    if not path.is_file():
        import torch

        from patchcore_lightning.backbones import load_backbone

        path.parent.mkdir(parents=True, exist_ok=True)
        state = load_backbone("wideresnet50", "random")[0].state_dict()
        partial = path.with_suffix(".partial")
        torch.save(state, partial, _use_new_zipfile_serialization=args.weights == "random-file")
        partial.replace(path)
    return str(path)


def _describe_weights(args, weights: str) -> str:
    if args.weights == "random-file":
        return f"seeded random values from {weights} (torch.save zip format: memory-mapped)"
    if args.weights == "random-legacy-file":
        return f"seeded random values from {weights} (torch's legacy format, as torchvision's WideResNet50 file)"
    if weights == "random":
        return "seeded random values built in the process (no weights file)"
    return "ImageNet weights from the torch cache" if weights == "null" else f"weights from {weights}"


def _grid(imagesize: int) -> int:
    return imagesize // 8  # WideResNet50 layer2: stride 8 (patch stride 1, padding keeps the grid)


def prepare_data(args) -> tuple[Path, str]:
    if args.data_root:
        return Path(args.data_root), args.category
    from patchcore_lightning.data.synthetic import make_synthetic_mvtec

    n_test = args.n_good + 3 * args.n_per_defect
    root = Path(args.workdir) / f"data_{args.disk_size}px_{args.n_train}train_{n_test}test"
    make_synthetic_mvtec(root, (args.category,), args.disk_size, args.n_train, args.n_good, args.n_per_defect)
    return root, args.category


def prepare_model(args, root: Path, category: str) -> Path:
    if args.model_path:
        return Path(args.model_path)
    n_train = len(list((root / category / "train" / "good").iterdir()))
    features = n_train * _grid(args.imagesize) ** 2
    percentage = args.bank_size / features
    if percentage > 1:
        raise SystemExit(f"--bank-size {args.bank_size} exceeds the {features} training patch features: "
                         "raise --n-train")
    weights = backbone_weights(args)
    tag = {"random": "", "null": "_imagenet"}.get(weights, f"_{Path(weights).stem}")
    out = Path(args.workdir) / f"fit_{root.name}_{args.imagesize}_{args.bank_size}_{args.sampler}{tag}"
    folder = out / "models" / f"mvtec_{category}"
    if (folder / "patchcore_lightning.json").is_file():
        return folder
    print(f"fit: {n_train} train images, {features} patch features, keeping {percentage:.5g} -> {folder}", flush=True)
    cmd = [
        sys.executable, str(ROOT / "lightning_cli.py"), "fit",
        "--data.root", str(root), "--data.categories", f"[{category}]",
        "--data.resize", str(args.resize), "--data.imagesize", str(args.imagesize),
        "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
        "--model.backbones", "[wideresnet50]", "--model.layers", "[layer2,layer3]",
        "--model.backbone_weights", weights, "--model.sampler", args.sampler,
        "--model.percentage", repr(percentage),
        "--trainer.accelerator", "gpu" if args.device.startswith("cuda") else "cpu",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--results_dir", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return folder


# --------------------------------------------------------------------------- child: stages
def child_stages(args) -> dict:
    import torch

    from patchcore_lightning.anomaly_map import segmentation_maps
    from patchcore_lightning.data.mvtec import MVTecDataModule
    from patchcore_lightning.embedding import aggregate_layers, patchify
    from patchcore_lightning.heap import release_free_heap
    from patchcore_lightning.memory_bank import MemoryBank
    from patchcore_lightning.module import PatchCoreModule, embed_images

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    dm = MVTecDataModule(
        args.data_root, [args.category], args.resize, args.imagesize, args.batch_size, args.num_workers
    )
    dm.setup("test")
    loader = dm.test_dataloader()
    n_images = len(dm.test_dataset)

    weights = backbone_weights(args)
    module = PatchCoreModule(model_paths=[args.model_path], backbone_weights=None if weights == "null" else weights)
    module.select(0, 1)
    module.to(device)
    module.members = module.load_members(args.model_path, args.imagesize)
    if cuda or args.knn != "auto":
        for member in module.members:
            member.bank = MemoryBank(member.bank.cpu_index, device if args.knn != "faiss" else "cpu", args.knn)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for extractor in module.extractors.values():
        extractor.to(memory_format=memory_format)
    module.eval()
    bank = module.members[0].bank
    p = module.members[0].params

    def to_device(batch):
        images, masks, labels, indices = batch
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        return images, masks.to(device, non_blocking=True), labels.to(device), indices.to(device)

    @torch.inference_mode()
    def real_pass() -> tuple[float, dict]:
        module.evaluation.reset()
        sync()
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            module.test_step(to_device(batch), i)
        result = module.category_result()
        sync()
        return time.perf_counter() - start, result

    @torch.inference_mode()
    def staged_pass() -> dict[str, float]:
        """``member_outputs`` and the metric, stage by stage (a transcription, checked against it)."""
        stages = dict.fromkeys(("data", "backbone", "aggregation", "knn", "segmentation", "metrics"), 0.0)

        def tick(stage: str, since: float) -> float:
            sync()
            now = time.perf_counter()
            stages[stage] += now - since
            return now

        module.evaluation.reset()
        sync()
        t = time.perf_counter()
        for images, masks, labels, indices in map(to_device, loader):
            t = tick("data", t)
            B, _, H, W = images.shape
            scores, maps = [], []
            for member in module.members:
                q = member.params
                layer_maps = module.extractors[member.extractor_key](images.float())
                t = tick("backbone", t)
                feats, (h, w) = embed_images([layer_maps[layer] for layer in q.layers], q.patchsize, q.patchstride,
                                             q.pretrain_embed_dimension, q.target_embed_dimension)
                t = tick("aggregation", t)
                patch = member.bank.patch_scores(feats, q.anomaly_scorer_num_nn).view(B, h, w)
                t = tick("knn", t)
                scores.append(patch.flatten(1).amax(dim=1))
                maps.append(segmentation_maps(patch, (H, W)))
                t = tick("segmentation", t)
            module.evaluation.update(torch.stack(scores, dim=1), torch.stack(maps, dim=1), masks, labels, indices)
            t = tick("metrics", t)
        stages["result"] = module.category_result()
        tick("metrics", t)
        return stages

    # Warm-up (lazy initialisations, oneDNN/cuDNN plans), and the transcription checked on one batch.
    with torch.inference_mode():
        first = to_device(next(iter(loader)))
        ours = module.member_outputs(first[0].float())
        layer_maps = module.extractors[module.members[0].extractor_key](first[0].float())
    out = {"n_images": n_images, "bank": [len(bank), bank.dim], "knn_backend": getattr(bank, "backend", "faiss"),
           "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
           "torch_threads": torch.get_num_threads()}

    # The backbone alone and the kNN alone on one batch: timed right before and right after every
    # pass, so that each pass has its own denominator, the mean of the two (this machine's speed
    # drifts by 10 % within minutes, and a neighbour's burst during one short timing would otherwise
    # make that pass's ratio an outlier).
    extractor = module.extractors[module.members[0].extractor_key]
    images = first[0].float()
    B = images.shape[0]
    layers = [layer_maps[layer] for layer in p.layers]
    with torch.inference_mode():
        feats, _ = embed_images(layers, p.patchsize, p.patchstride, p.pretrain_embed_dimension,
                                p.target_embed_dimension)
        torch.testing.assert_close(ours[0][:, 0], bank.patch_scores(feats, p.anomaly_scorer_num_nn).view(B, -1).amax(1))
    dims = (p.pretrain_embed_dimension, p.target_embed_dimension)
    micro = {
        "backbone": lambda: extractor(images),
        "knn": lambda: bank.patch_scores(feats, p.anomaly_scorer_num_nn),
        "aggregation": lambda: embed_images(layers, p.patchsize, p.patchstride, *dims),
    }

    @torch.inference_mode()
    def alone_now(names) -> dict[str, float]:
        return {name: _time_calls(micro[name], args.micro_repeats, sync) / B for name in names}

    totals, staged, per_pass_alone, brackets, staged_gap = [], [], [], [], 0.0
    with _ForeignLoad() as load:
        # The real passes first, back to back: the process as close to the CLI's as it gets, not yet
        # through the staged passes' other allocation pattern (no measurable effect on the ratio
        # here: 1.271 interleaved, 1.263 this way, one run each).
        for _ in range(args.repeats):
            before = alone_now(("backbone", "knn"))
            release_free_heap()  # the CLI's loop starts right after load_members hands the free heap back
            seconds, result = real_pass()
            after = alone_now(("backbone", "knn"))
            totals.append(seconds)
            per_pass_alone.append({k: (before[k] + after[k]) / 2 for k in before})
            brackets.append({"before": before, "after": after})
        for _ in range(args.staged_repeats):
            stages = staged_pass()
            # The transcription must compute what test_step computes (GPU kernels with atomics may
            # reorder float sums between runs, so a tolerance).
            again = stages.pop("result")
            gap = max(abs(_metric_values(again)[k] - _metric_values(result)[k]) for k in _metric_values(result))
            raw, raw_again = result["raw_scores"], again["raw_scores"]
            gap = max(gap, float(((raw_again - raw).abs() / raw.abs()).max()))
            if not gap <= 1e-4:
                raise SystemExit(f"the staged transcription of member_outputs computes other numbers than "
                                 f"test_step ({gap:.2e})")
            staged_gap = max(staged_gap, gap)
            staged.append(stages)
    out["passes_foreign_cpu_share"] = load.share
    out["staged_vs_real_metric_gap"] = staged_gap
    out["metrics"] = _metric_values(result)
    out["raw_scores"] = result["raw_scores"][:, 0].tolist()
    del result
    out["total_s_per_image"] = _median(totals) / n_images
    out["totals_s"] = totals
    out["stages_s_per_image"] = {k: _median([s[k] for s in staged]) / n_images for k in staged[0]}
    out["staged_total_s_per_image"] = _median([sum(s.values()) for s in staged]) / n_images
    out["per_pass_alone_s_per_image"] = per_pass_alone
    out["per_pass_alone_brackets_s_per_image"] = brackets
    out["per_pass_ratios"] = [t / n_images / (a["backbone"] + a["knn"]) for t, a in zip(totals, per_pass_alone)]

    # Everything alone once more, the aggregation (ours and the original's chain) included.
    if not args.skip_original_chain:
        micro["aggregation_original_chain"] = lambda: aggregate_layers(
            [patchify(f, p.patchsize, p.patchstride) for f in layers], *dims
        )
    if out["knn_backend"] != "faiss":  # the CPU faiss search, for comparison
        cpu_bank = MemoryBank(bank.cpu_index, "cpu", "faiss")
        micro["knn_faiss_cpu"] = lambda: cpu_bank.patch_scores(feats, p.anomaly_scorer_num_nn)
    elif not cuda and hasattr(bank, "backend"):
        torch_bank = MemoryBank(bank.cpu_index, "cpu", "torch")
        micro["knn_torch_cpu"] = lambda: torch_bank.patch_scores(feats, p.anomaly_scorer_num_nn)
    with _ForeignLoad() as load:
        alone = alone_now(list(micro))
    out["alone_foreign_cpu_share"] = load.share
    out["alone_s_per_image"] = alone
    # total / (backbone + kNN) of each pass with the backbone and kNN timed around it; the median
    out["ratio"] = _median(out["per_pass_ratios"])

    if args.large_banks:
        out["large_banks"] = _large_banks(args, dm, module, bank, device, sync)
    if cuda and args.precision_study:
        out["precision"] = _precision_study(module, real_pass, out, n_images)
    if cuda:
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    out.update(_peak_rss_mb())
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()} cores"
    except OSError:
        pass
    return f"CPU x {os.cpu_count()}"


def _metric_values(result: dict) -> dict[str, float]:
    from patchcore_lightning.metrics import METRIC_NAMES

    return {k: float(result[k]) for k in METRIC_NAMES}


def _time_calls(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return _median(times)


def _large_banks(args, dm, module, bank, device, sync) -> dict:
    """kNN alone against banks of real patch features of the train split (rows drawn with
    replacement plus a little noise, so that no two are equal), of the sizes in --large-banks."""
    import torch

    from patchcore_lightning.embedding import embed
    from patchcore_lightning.memory_bank import MemoryBank

    member = module.members[0]
    p = member.params
    extractor = module.extractors[member.extractor_key]
    dm.setup("fit")
    feats = []
    with torch.inference_mode():
        for i, (images, *_) in enumerate(dm.train_dataloader()):
            f, _ = embed([extractor(images.to(device))[layer] for layer in p.layers], p.patchsize, p.patchstride,
                         p.pretrain_embed_dimension, p.target_embed_dimension)
            feats.append(f.cpu())
            if i == 0:
                queries = f  # one batch of real queries, on the device
        pool = torch.cat(feats)  # (n_train * h * w, D)
    generator = torch.Generator().manual_seed(0)
    B = args.batch_size
    out = {}
    for size in args.large_banks:
        rows = pool[torch.randint(len(pool), (size,), generator=generator)]
        rows += 1e-3 * pool.std() * torch.randn(rows.shape, generator=generator)
        entry = {}
        for backend, where in (("torch", device), ("faiss", "cpu")):
            if backend == "faiss" and size > args.faiss_large_bank_limit:
                continue
            big = MemoryBank.from_features(rows, where, backend)
            with torch.inference_mode():
                entry[f"{backend}_{torch.device(where).type}_s_per_image"] = (
                    _time_calls(lambda big=big: big.patch_scores(queries, p.anomaly_scorer_num_nn), 2, sync) / B
                )
            del big
        out[str(size)] = entry
    return out


def _precision_study(module, real_pass, fp32: dict, n_images: int) -> dict:
    """TF32 (cuDNN and cuBLAS) and a bf16 backbone, each on one pass: speed and drift from fp32."""
    import torch
    from torch import nn

    class _Bf16(nn.Module):  # the backbone under bf16 autocast, its outputs back in float32
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.inner(x)
            return {k: v.float() for k, v in out.items()}

    def drift(result) -> dict:
        raw = torch.tensor(fp32["raw_scores"])
        ours = result["raw_scores"][:, 0].cpu()
        metrics = _metric_values(result)
        return {
            "s_per_image": None,
            "max_metric_abs_diff": max(abs(metrics[k] - fp32["metrics"][k]) for k in metrics),
            "max_raw_score_rel_diff": float(((ours - raw).abs() / raw.abs()).max()),
            "metrics": metrics,
        }

    study = {}
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    real_pass()
    seconds, result = real_pass()
    study["tf32"] = drift(result) | {"s_per_image": seconds / n_images}
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    saved = dict(module.extractors)
    for key, extractor in saved.items():
        module.extractors[key] = _Bf16(extractor)
    real_pass()
    seconds, result = real_pass()
    study["bf16_backbone"] = drift(result) | {"s_per_image": seconds / n_images}
    for key, extractor in saved.items():
        module.extractors[key] = extractor
    return study


# --------------------------------------------------------------------------- child: the CLI
def child_cli(args) -> dict:
    from patchcore_lightning import cli
    from patchcore_lightning.module import PatchCoreModule

    # Instrumentation of this child only: when the test loop starts and when the metrics are done.
    marks: dict[str, float] = {}
    start_hook, end_hook = PatchCoreModule.on_test_start, PatchCoreModule.on_test_epoch_end

    def on_test_start(self):
        marks.setdefault("loop_start", time.perf_counter())
        start_hook(self)

    def on_test_epoch_end(self):
        end_hook(self)
        marks["loop_end"] = time.perf_counter()

    PatchCoreModule.on_test_start, PatchCoreModule.on_test_epoch_end = on_test_start, on_test_epoch_end
    n_images = sum(1 for f in (Path(args.data_root) / args.category / "test").rglob("*") if f.is_file())
    argv = [
        "test", "--data.root", args.data_root, "--data.categories", f"[{args.category}]",
        "--data.resize", str(args.resize), "--data.imagesize", str(args.imagesize),
        "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
        "--model.model_paths", f"[{args.model_path}]", "--model.backbone_weights", backbone_weights(args),
        "--trainer.accelerator", "gpu" if args.device.startswith("cuda") else "cpu",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--results_dir", tempfile.mkdtemp(prefix="bench_eval_cli_"),
    ]
    with _ForeignLoad() as load:
        start = time.perf_counter()
        cli.main(argv)
        wall = time.perf_counter() - start
    return {
        "n_images": n_images,
        "wall_s": wall,
        "wall_s_per_image": wall / n_images,
        "loop_s_per_image": (marks["loop_end"] - marks["loop_start"]) / n_images,
        "foreign_cpu_share": load.share,
        "scipy_imported": "scipy" in sys.modules,
        **_peak_rss_mb(),
    }


# --------------------------------------------------------------------------- parent
def _run_child(kind: str, args, root: Path, category: str, model: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        argv = [a for a in sys.argv[1:]]
        argv += ["--data-root", str(root), "--category", category, "--model-path", str(model),
                 "--child", kind, "--child-out", str(result_file)]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            raise SystemExit(f"{kind} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        out = json.loads(result_file.read_text())
        out["process_wall_s"] = time.perf_counter() - start
        return out


def _mib(mib: float) -> str:
    return f"{mib:,.0f} MiB ({mib * 2**20 / 1e9:.3f} GB)"


def _report(args, stages: dict | None, cli_run: dict | None) -> None:
    ms = lambda s: f"{1000 * s:8.1f} ms"  # noqa: E731
    if stages:
        print(f"\n== evaluation path: {stages['device_name']} ({stages['device']}, "
              f"{stages['torch_threads']} torch threads), "
              f"{args.imagesize}², batch {args.batch_size}, {args.num_workers} workers, channels_last "
              f"{args.channels_last}, bank {stages['bank'][0]} x {stages['bank'][1]} ({stages['knn_backend']}), "
              f"{stages['n_images']} test images, {args.repeats} passes, {args.staged_repeats} staged (medians)")
        total = stages["total_s_per_image"]
        print(f"total (test_step + compute)   {ms(total)}/img   {1 / total:7.2f} images/s")
        print("stages (member_outputs, timed one by one):")
        for name, seconds in stages["stages_s_per_image"].items():
            print(f"  {name:<27} {ms(seconds)}/img")
        print(f"  {'sum':<27} {ms(stages['staged_total_s_per_image'])}/img")
        print("alone, on one batch:")
        for name, seconds in stages["alone_s_per_image"].items():
            print(f"  {name:<27} {ms(seconds)}/img")
        alone = stages["alone_s_per_image"]
        if "aggregation_original_chain" in alone:
            speedup = alone["aggregation_original_chain"] / alone["aggregation"]
            print(f"  aggregation speed-up over the original's chain: {speedup:.1f}x")
        ratios = ", ".join(f"{r:.3f}" for r in stages["per_pass_ratios"])
        print(f"RATIO total / (backbone + kNN) = {stages['ratio']:.3f} (median of the passes: {ratios}; each pass "
              "over the mean of the backbone and kNN alone timed right before and right after it)")
        gpu = stages.get("gpu_peak_allocated_mb")
        print(f"peak RSS {_mib(stages['peak_rss_mb'])} (workers {stages['peak_rss_workers_mb']:.0f} MiB; this process "
              "also ran the staged passes and the timings alone)"
              + (f", GPU peak allocated {gpu:.0f} MiB" if gpu is not None else ""))
        print("metrics: " + ", ".join(f"{k} {v:.6f}" for k, v in stages["metrics"].items()))
        for key in ("passes_foreign_cpu_share", "alone_foreign_cpu_share"):
            if stages[key] > 0.05:
                print(f"WARNING: other processes used {100 * stages[key]:.0f}% of the CPUs during the "
                      f"{key.split('_')[0]} measurements: these figures are not reliable")
        for size, entry in stages.get("large_banks", {}).items():
            print(f"kNN alone, bank {int(size):>7} x {stages['bank'][1]}: "
                  + ", ".join(f"{k.removesuffix('_s_per_image')} {ms(v)}/img" for k, v in entry.items()))
        for name, entry in stages.get("precision", {}).items():
            print(f"{name}: {1 / entry['s_per_image']:.1f} images/s, largest metric difference from fp32 "
                  f"{entry['max_metric_abs_diff']:.2e}, raw scores {entry['max_raw_score_rel_diff']:.2e} (relative)")
    print(f"\nbackbone weights: {_describe_weights(args, backbone_weights(args))}")
    if cli_run:
        print(f"\n== lightning_cli.py test, {cli_run['n_images']} images: wall {cli_run['wall_s']:.1f} s "
              f"({ms(cli_run['wall_s_per_image'])}/img with start-up; "
              f"test loop {ms(cli_run['loop_s_per_image'])}/img)")
        print(f"PEAK RSS of the evaluation (CLI main process) {_mib(cli_run['peak_rss_mb'])}; DataLoader workers "
              f"{cli_run['peak_rss_workers_mb']:.0f} MiB each at most; scipy "
              + ("imported (torchmetrics imports it when installed, e.g. by the test extras: ~50 MiB)"
                 if cli_run.get("scipy_imported") else "not installed (the runtime install)")
              + ("; triton not imported (as lightning_cli.py)" if cli_run.get("triton_skipped")
                 else f"; triton imported ({ENV_KEEP_TRITON_HINT})"))
        print(f"GOMP_SPINCOUNT {cli_run.get('gomp_spincount')} (the environment's; torch's libgomp runs faiss's "
              f"parallel regions too)")
        if stages:
            alone = _median([a["backbone"] + a["knn"] for a in stages["per_pass_alone_s_per_image"]])
            ratio = cli_run["loop_s_per_image"] / alone
            print(f"RATIO test loop / (backbone + kNN) = {ratio:.3f} (backbone + kNN alone: the median of the "
                  "stages process's per-pass timings)")
        if cli_run["foreign_cpu_share"] > 0.05:
            print(f"WARNING: other processes used {100 * cli_run['foreign_cpu_share']:.0f}% of the CPUs "
                  "during the CLI run")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="/tmp/bench_eval", help="generated data and models (reused)")
    parser.add_argument("--data-root", help="an MVTec-format root instead of the synthetic category")
    parser.add_argument("--category", default="weave", help="category (a synthetic one: weave, grain, tiles)")
    parser.add_argument("--model-path", help="a model folder in the original's format instead of fitting one")
    parser.add_argument("--weights", default="random-file",
                        help="backbone weights: random-file (seeded random values in a torch.save file under "
                             "<workdir>/weights), random-legacy-file (the same in torch's legacy format), random "
                             "(built from the seed, no file), null (ImageNet) or a state_dict file")
    parser.add_argument("--disk-size", type=int, default=1024, help="side of the generated PNGs")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-good", type=int, default=30)
    parser.add_argument("--n-per-defect", type=int, default=40)
    parser.add_argument("--imagesize", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--bank-size", type=int, default=4704, help="rows of the fitted bank")
    parser.add_argument("--sampler", default="approx_greedy_coreset")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    parser.add_argument("--knn", choices=("auto", "faiss", "torch"), default="auto",
                        help="kNN backend of the stage runs")
    parser.add_argument("--channels-last", type=int, choices=(0, 1), default=0,
                        help="run the backbone in channels_last (the stage runs only; the CLI runs as the module does)")
    parser.add_argument("--repeats", type=int, default=11, help="real passes (their median ratio is printed)")
    parser.add_argument("--staged-repeats", type=int, default=3, help="passes timed stage by stage")
    parser.add_argument("--micro-repeats", type=int, default=7)
    parser.add_argument("--skip-original-chain", action="store_true",
                        help="do not time the original's aggregation chain")
    parser.add_argument("--large-banks", type=int, nargs="*", default=[],
                        help="also time the kNN alone against banks of these sizes")
    parser.add_argument("--faiss-large-bank-limit", type=int, default=10**9, help="largest bank timed with CPU faiss")
    parser.add_argument("--precision-study", action="store_true",
                        help="GPU: TF32 and bf16-backbone passes and their drift")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--child", choices=("stages", "cli"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        from patchcore_lightning.startup import prepare_process

        # as lightning_cli.py does; the JSON records it, the report prints it
        prepared = prepare_process()
        result = child_stages(args) if args.child == "stages" else child_cli(args)
        result.update(prepared, gomp_spincount=os.environ.get("GOMP_SPINCOUNT", "libgomp's default"))
        Path(args.child_out).write_text(json.dumps(result))
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    root, category = prepare_data(args)
    model = prepare_model(args, root, category)
    print(f"data {root / category}, model {model}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    stages = None if args.skip_stages else _run_child("stages", args, root, category, model)
    cli_run = None if args.skip_cli else _run_child("cli", args, root, category, model)
    _report(args, stages, cli_run)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "stages": stages, "cli": cli_run}, indent=1))


if __name__ == "__main__":
    main()
