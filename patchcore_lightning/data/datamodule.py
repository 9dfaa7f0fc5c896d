"""The DataModule: one category at a time of an MVTec-format data set, and a folder for ``predict``."""

from __future__ import annotations

import warnings

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from .folder import ImageFolderDataset
from .images import PADDING_INDEX, DataError, SampleDataset
from .mvtec import list_samples

__all__ = ["AnomalyDataModule", "ShardBatches", "shard_batches"]


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


class AnomalyDataModule(L.LightningDataModule):
    """The categories of an MVTec-format data set, served one at a time (``select`` picks it).

    Args:
        root: folder holding one subfolder per category (the MVTec AD root).
        categories: categories to evaluate, in order, e.g. ``[bottle, cable]``.
        resize: shorter image side after resizing (bilinear), before the center crop.
        imagesize: side of the square center crop fed to the backbone.
        batch_size: images per batch.
        num_workers: data loading processes (0 loads in the main process).
        synthetic: generate the demo's synthetic categories under ``root`` where they are missing
            (``patchcore_lightning.data.synthetic``; categories weave, grain, tiles).
        predict_dir: for ``predict``: a folder of images (any layout, searched recursively).
    """

    def __init__(
        self,
        root: str = "data/mvtec",
        categories: list[str] = ["bottle"],  # noqa: B006  (read-only; LightningCLI needs a literal default)
        resize: int = 256,
        imagesize: int = 224,
        batch_size: int = 2,
        num_workers: int = 4,
        synthetic: bool = False,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not categories:
            raise ValueError("data.categories is empty: list at least one category")
        if len(set(categories)) != len(categories):
            raise ValueError(f"data.categories lists a category twice: {categories}")
        if imagesize < 1 or resize < imagesize:
            raise ValueError(f"need 1 <= imagesize <= resize, got resize={resize}, imagesize={imagesize}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.save_hyperparameters(logger=False)
        self.categories = list(categories)
        self.category = self.categories[0]
        self.train_dataset: SampleDataset | None = None
        self.test_dataset: SampleDataset | None = None
        self.predict_dataset: ImageFolderDataset | None = None

    @staticmethod
    def dataset_name_of(category: str) -> str:
        """A category's name in results.csv, segmentation images, TensorBoard and model folders."""
        return f"mvtec_{category}"

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
            from .synthetic import make_synthetic_mvtec

            make_synthetic_mvtec(self.hparams.root, tuple(self.categories))

    def setup(self, stage: str) -> None:
        h = self.hparams
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = SampleDataset(list_samples(h.root, self.category, "train"), h.resize, h.imagesize)
        if stage in ("test", "validate") and self.test_dataset is None:
            self.test_dataset = SampleDataset(list_samples(h.root, self.category, "test"), h.resize, h.imagesize)
        if stage == "predict" and self.predict_dataset is None:
            if not h.predict_dir:
                raise DataError("predict needs data.predict_dir: the folder of images to score")
            # ShardBatches returns every index (no drop_last to set), which Lightning cannot tell
            warnings.filterwarnings("ignore", r"You are using a custom batch sampler `ShardBatches` for prediction")
            self.predict_dataset = ImageFolderDataset(h.predict_dir, h.resize, h.imagesize)

    def _loader(self, dataset: Dataset) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            batch_sampler=ShardBatches(len(dataset), self.hparams.batch_size, rank, world),
            num_workers=self.hparams.num_workers,
            pin_memory=on_gpu,
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
