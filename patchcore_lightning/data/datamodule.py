"""The DataModule: one category at a time of a benchmark's data set, and a folder for ``predict``."""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import mvtec, visa
from .folder import ImageFolderDataset
from .images import PADDING_INDEX, DataError, Sample, SampleDataset

__all__ = [
    "BENCHMARKS",
    "AnomalyDataModule",
    "Benchmark",
    "ItemwiseLoader",
    "ShardBatches",
    "list_split",
    "loader_settings",
    "shard_batches",
]

Benchmark = Literal["mvtec_ad", "mvtec_ad2", "visa", "mpdd", "btad", "folder"]
# benchmark → the prefix of its rows in results.csv (and of its segmentation images, TensorBoard tags,
# model folders): mvtec_bottle, visa_candle, ...
BENCHMARKS: dict[str, str] = {
    "mvtec_ad": "mvtec", "mvtec_ad2": "mvtec_ad2", "visa": "visa", "mpdd": "mpdd", "btad": "btad", "folder": "folder",
}
_LAYOUTS = {"mvtec_ad": mvtec.MVTEC_AD, "mvtec_ad2": mvtec.MVTEC_AD2, "mpdd": mvtec.MPDD, "btad": mvtec.BTAD,
            "folder": mvtec.FOLDER}


def list_split(benchmark: str, root: str, category: str, split: str) -> list[Sample]:
    """A category's ``train`` or ``test`` samples, read in the benchmark's own layout."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if benchmark == "visa":
        return visa.list_samples(root, category, split)
    return mvtec.list_samples(root, category, split, _LAYOUTS[benchmark])


# Batch sizes when data.batch_size is null: small on a CPU, where a batch's working memory is RSS and
# larger batches are no faster; enough on a GPU to keep it busy with one launch sequence per batch.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 2, 32
# DataLoader workers when data.num_workers is null: at most this many per process on a GPU (decoding
# MVTec's 1024² PNGs is the slowest stage there), and on a CPU as many as cores up to 2, since the
# backbone wants the cores too.
GPU_MAX_WORKERS, CPU_MAX_WORKERS = 16, 2


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_settings(
    batch_size: int | None, num_workers: int | None, accelerator: str, processes_per_node: int = 1
) -> tuple[int, int]:
    """The batch size and DataLoader workers to use: the given ones, or the defaults for the device
    (``accelerator`` ``cpu`` or another), workers shared among the node's processes."""
    on_cpu = accelerator == "cpu"
    if batch_size is None:
        batch_size = CPU_BATCH_SIZE if on_cpu else GPU_BATCH_SIZE
    if num_workers is None:
        per_process = max(1, _cores() // max(1, processes_per_node))
        num_workers = min(per_process, CPU_MAX_WORKERS) if on_cpu else min(max(1, per_process - 1), GPU_MAX_WORKERS)
    return batch_size, num_workers


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The batches of items 0..n-1 that ``rank`` of ``world_size`` processes loads.

    The single-process batches (``batch_size`` consecutive items) are dealt out whole: rank r takes
    batches r, r + W, r + 2W, ... Every item is loaded once, and in the very batch one process
    would put it in, so kernels that round differently for another batch composition cannot change
    a bit. Every rank gets as many batches as the busiest one (at least one), those it lacks holding
    the placeholder ``PADDING_INDEX``: Lightning's training loop synchronises the processes at every
    batch, and every process must join the gather of the metric states; the model skips placeholders.
    """
    batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    mine = batches[rank::world_size]
    per_rank = max(1, -(-len(batches) // world_size))
    return mine + [[PADDING_INDEX]] * (per_rank - len(mine))


class ShardBatches(Sampler[list[int]]):
    """``shard_batches`` as a DataLoader's batch sampler."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.batches = shard_batches(n, batch_size, rank, world_size)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _stack_items(items: list[tuple], pin_memory: bool) -> list:
    """Items (tuples of tensors, ints, strings) → a batch as ``default_collate`` makes it: a list of
    the tensors stacked (into page-locked memory when ``pin_memory``), the ints as an int64 tensor,
    the strings as a tuple."""
    out = []
    for field in zip(*items):
        first = field[0]
        if isinstance(first, torch.Tensor):
            buffer = torch.empty((len(field), *first.shape), dtype=first.dtype, pin_memory=pin_memory)
            out.append(torch.stack(field, out=buffer))  # (B, *item shape)
        elif isinstance(first, int):
            out.append(torch.tensor(field))  # (B,) int64
        else:
            out.append(field)
    return out


class ItemwiseLoader(DataLoader):
    """A DataLoader over ``batch_sampler``'s batches whose items are read one at a time by all its
    workers, then stacked into those batches, in order, in this process.

    A DataLoader hands each worker a whole batch: 150 test images in batches of 32 are 5 batches,
    so 5 of 15 workers ever work, and a batch waits for one worker to decode its 32 images. Here
    every worker decodes items of every batch. The batches are the batch sampler's, item for item
    and pixel for pixel (the order ``shard_batches`` deals, which DDP equality rests on). With 0 or
    1 workers it is a plain DataLoader.
    """

    def __init__(self, dataset: Dataset, batch_sampler: Sampler[list[int]], num_workers: int = 0,
                 pin_memory: bool = False, **kwargs) -> None:
        # **kwargs: what Lightning passes when it rebuilds the loader (predict wraps the batch sampler)
        super().__init__(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory, **kwargs)

    def __iter__(self):
        if self.num_workers < 2:
            return super().__iter__()
        return self._batches()

    def _batches(self):
        batches = list(self.batch_sampler)  # drawn up front (Lightning's predict wrapper records them as drawn)
        items = DataLoader(
            self.dataset,
            sampler=[index for batch in batches for index in batch],
            batch_size=None,  # one item at a time, to whichever worker is free
            num_workers=self.num_workers,
            worker_init_fn=self.worker_init_fn,
            multiprocessing_context=self.multiprocessing_context,
            timeout=self.timeout,
        )
        stream = iter(items)
        for batch in batches:
            yield _stack_items([next(stream) for _ in batch], self.pin_memory)


class AnomalyDataModule(L.LightningDataModule):
    """The categories of a benchmark's data set, served one at a time (``select`` picks it).

    Args:
        root: the data set's folder as distributed (for MVTec AD the folder holding ``bottle/``, ...).
        categories: categories to evaluate, in order, e.g. ``[bottle, cable]``.
        benchmark: the layout of ``root``: ``mvtec_ad``, ``mvtec_ad2``, ``visa``, ``mpdd``, ``btad``, or
            ``folder`` (your own images in MVTec AD's layout, ``ground_truth/`` optional); it also
            names the rows of results.csv (``mvtec_<category>``, ``visa_<category>``, ...).
        resize: shorter image side after resizing (bilinear), before the center crop.
        imagesize: side of the square center crop fed to the backbone.
        batch_size: images per batch; null: 2 on a CPU, 32 on a GPU.
        num_workers: data loading processes (0 loads in the main process); null: on a GPU the cores
            of each process (the node's cores shared among its processes) less one, at most 16; on
            a CPU 2 (the backbone needs the cores too).
        synthetic: generate the demo's synthetic categories under ``root`` where they are missing
            (``patchcore_lightning.data.synthetic``; categories weave, grain, tiles).
        predict_dir: for ``predict``: a folder of images (any layout, searched recursively).
    """

    def __init__(
        self,
        root: str = "data/mvtec",
        categories: list[str | int] = ["bottle"],  # noqa: B006  (read-only; LightningCLI needs a literal default)
        benchmark: Benchmark = "mvtec_ad",
        resize: int = 256,
        imagesize: int = 224,
        batch_size: int | None = None,
        num_workers: int | None = None,
        synthetic: bool = False,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not categories:
            raise ValueError("data.categories is empty: list at least one category")
        numbers = [c for c in categories if not isinstance(c, str)]
        if numbers:  # YAML reads [01, 02] as numbers, and 01 as 1: the folder name is lost
            raise ValueError(
                f"data.categories: {numbers} were read as numbers; quote category names that look like "
                f"numbers, e.g. --data.categories '[\"01\", \"02\"]' (BTAD)"
            )
        if len(set(categories)) != len(categories):
            raise ValueError(f"data.categories lists a category twice: {categories}")
        if imagesize < 1 or resize < imagesize:
            raise ValueError(f"need 1 <= imagesize <= resize, got resize={resize}, imagesize={imagesize}")
        if (batch_size is not None and batch_size < 1) or (num_workers is not None and num_workers < 0):
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.save_hyperparameters(logger=False)
        self.categories = list(categories)
        self.category = self.categories[0]
        self.train_dataset: SampleDataset | None = None
        self.test_dataset: SampleDataset | None = None
        self.predict_dataset: ImageFolderDataset | None = None

    def dataset_name_of(self, category: str) -> str:
        """A category's name in results.csv, segmentation images, TensorBoard and model folders."""
        return f"{BENCHMARKS[self.hparams.benchmark]}_{category}"

    @property
    def dataset_name(self) -> str:
        return self.dataset_name_of(self.category)

    @property
    def imagesize(self) -> int:
        return self.hparams.imagesize

    def select(self, category: str) -> None:
        """Serve ``category`` from now on; its data sets are made in ``setup``."""
        if category not in self.categories:
            raise ValueError(f"category {category!r} is not in data.categories {self.categories}")
        self.category = category
        self.train_dataset = self.test_dataset = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic:
            if self.hparams.benchmark != "mvtec_ad":
                raise ValueError("data.synthetic makes an MVTec AD layout: set data.benchmark mvtec_ad")
            from .synthetic import make_synthetic_mvtec

            make_synthetic_mvtec(self.hparams.root, tuple(self.categories))

    def setup(self, stage: str) -> None:
        h = self.hparams
        binarize = h.benchmark == "visa"  # VisA marks defects with any non-zero value
        for split, wanted in (("train", stage == "fit"), ("test", stage in ("test", "validate"))):
            if wanted and getattr(self, f"{split}_dataset") is None:
                samples = list_split(h.benchmark, h.root, self.category, split)
                setattr(self, f"{split}_dataset", SampleDataset(samples, h.resize, h.imagesize, binarize))
        if stage == "predict" and self.predict_dataset is None:
            if not h.predict_dir:
                raise DataError("predict needs data.predict_dir: the folder of images to score")
            self.predict_dataset = ImageFolderDataset(h.predict_dir, h.resize, h.imagesize)

    def _loader(self, dataset: Dataset) -> DataLoader:
        trainer = self.trainer
        if trainer is None:
            rank, world, device, local = 0, 1, "cpu", 1
        else:
            rank, world = trainer.global_rank, trainer.world_size
            device, local = trainer.strategy.root_device.type, trainer.num_devices
        batch_size, num_workers = loader_settings(self.hparams.batch_size, self.hparams.num_workers, device, local)
        # on a GPU the workers' decoding is the floor of the loop, and 15 workers outnumber a category's
        # batches: they decode items; on a CPU (batches of 2, workers busy with many batches, the cores
        # shared with the backbone) the per-item hand-over measured slower (benchmarks/README.md)
        loader = DataLoader if device == "cpu" else ItemwiseLoader
        return loader(
            dataset,
            batch_sampler=ShardBatches(len(dataset), batch_size, rank, world),
            num_workers=num_workers,
            pin_memory=device == "cuda",  # page-locked batches: Lightning's copies to the GPU are then asynchronous
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "setup('fit') first"
        return self._loader(self.train_dataset)

    def test_dataloader(self) -> DataLoader:
        assert self.test_dataset is not None, "setup('test') first"
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        assert self.predict_dataset is not None, "setup('predict') first"
        return self._loader(self.predict_dataset)
