"""MVTec AD: one category's test (or train) split as tensors, and a DataModule over categories.

Layout: ``<root>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}``.
Test images are ordered by anomaly type (sorted), then file name (sorted), as the original.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from . import png

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "DataError", "MVTecDataModule", "MVTecDataset", "Sample"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A data set that does not follow the MVTec AD layout, or an unreadable file in it."""


@dataclass(frozen=True)
class Sample:
    """One test image: its path, anomaly type and ground-truth mask path (None for ``good``)."""

    image: Path
    anomaly: str
    mask: Path | None

    @property
    def label(self) -> int:
        return int(self.anomaly != "good")

    @property
    def name(self) -> str:
        """``<anomaly>_<file stem>``, the name of its segmentation image."""
        return f"{self.anomaly}_{self.image.stem}"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_samples(root: str | os.PathLike, category: str, split: str = "test") -> list[Sample]:
    """The samples of one category's split, in the original's order, with masks paired by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    category_dir = root / category
    if not category_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"category folder not found: {category_dir} (categories in {root}: {found})")
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise DataError(f"no {split}/ folder in {category_dir}")
    samples: list[Sample] = []
    for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        anomaly = type_dir.name
        images = _images_in(type_dir)
        if split != "test" or anomaly == "good":
            samples += [Sample(image, anomaly, None) for image in images]
            continue
        mask_dir = category_dir / "ground_truth" / anomaly
        masks = {p.stem: p for p in _images_in(mask_dir)} if mask_dir.is_dir() else {}
        for image in images:
            mask = masks.pop(f"{image.stem}_mask", None)
            if mask is None:
                raise DataError(
                    f"no ground-truth mask for {image.relative_to(category_dir)} "
                    f"(looked for {image.stem}_mask.* in {mask_dir})"
                )
            samples.append(Sample(image, anomaly, mask))
        if masks:
            raise DataError(f"{mask_dir}: masks without a test image: {sorted(masks)}")
    if not samples:
        raise DataError(f"no images in {split_dir} (looked for {', '.join(IMAGE_EXTENSIONS)} in its subfolders)")
    return samples


def _read(path: Path, modes: tuple[str, ...]) -> Image.Image:
    """The image in ``path``: as is if its mode is one of ``modes``, else converted to ``modes[0]``.

    Pixel for pixel ``Image.open(path).convert(modes[0])`` when the mode is ``modes[0]``, without
    convert's copy; raises what that raises (PIL decodes lazily: truncated files fail in ``load``).
    8-bit RGB and gray PNGs are decoded by libspng (``png.py``); a file libspng or the chunk CRCs
    reject goes to PIL, which then decodes or raises as the plain chain does.
    """
    with Image.open(path) as img:
        if img.mode not in modes:
            return img.convert(modes[0])
        if png.fast_case(img):  # 8-bit RGB or gray PNG: libspng, the same pixels in less CPU
            try:
                return png.load_png(img, path)
            except (ValueError, RuntimeError, OSError):
                pass  # a damaged file: PIL decides, with its pixels or its error (the plain chain's message)
        img.load()
        return img


def _open(path: Path, modes: tuple[str, ...]) -> Image.Image:
    try:
        return _read(path, modes)
    except Exception as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


# An 8-bit gray image stays L: convert("RGB") copies the gray value into R, G and B, and resizing
# and cropping commute with that (PIL resamples every band with the same integer arithmetic), so
# ``_to_normalized_tensor`` copies it after resizing, and PIL resizes one band instead of three.
_IMAGE_MODES = ("RGB", "L")


def _exact_box(in_size: int, out_size: int, offset: int, crop: int) -> tuple[float, float] | None:
    """The source interval of output pixels ``offset .. offset + crop`` of a resize to ``out_size``.

    PIL resizing only that interval (``resize(box=...)``) computes the very filter weights of the
    full resize where every pixel centre it derives from the box, in float32 and double, is exact:
    true when the scale is a dyadic rational p / 2^e and (2 out_size + 1) p < 2^24 (1024, 900 or
    700 resized to 256, say; not 1024 resized to 366). None otherwise.
    """
    scale = Fraction(in_size, out_size)
    q = scale.denominator
    if q & (q - 1) or (2 * out_size + 1) * scale.numerator >= 2**24:
        return None
    return float(offset * scale), float((offset + crop) * scale)


class _ResizeCrop:
    """``Resize(resize)`` then ``CenterCrop(imagesize)`` of a PIL image, bit for bit as torchvision.

    Where exact (``_exact_box``), resizes only the cropped region: 224^2 output pixels instead of
    256^2, and no crop. Other modes than RGB and L (where PIL resizes otherwise) take torchvision's way.
    """

    def __init__(self, resize: int, imagesize: int) -> None:
        self.resize = resize
        self.imagesize = imagesize
        self.reference = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(imagesize)])
        self._boxes: dict[tuple[int, int], tuple[float, float, float, float] | None] = {}

    def _box(self, W: int, H: int) -> tuple[float, float, float, float] | None:
        # torchvision's sizes: the shorter side becomes `resize`, the longer int(resize * long / short);
        # the crop starts at round((side - imagesize) / 2)
        S = self.imagesize
        if W <= H:
            w, h = self.resize, int(self.resize * H / W)
        else:
            w, h = int(self.resize * W / H), self.resize
        if w == W or h == H or S > w or S > h:  # not resized along an axis, or padded: not our case
            return None
        left, top = round((w - S) / 2), round((h - S) / 2)
        x, y = _exact_box(W, w, left, S), _exact_box(H, h, top, S)
        return None if x is None or y is None else (x[0], y[0], x[1], y[1])

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size not in self._boxes:
            self._boxes[img.size] = self._box(*img.size)
        box = self._boxes[img.size]
        if box is None or img.mode not in ("RGB", "L"):
            return self.reference(img)
        return img.resize((self.imagesize, self.imagesize), Image.BILINEAR, box=box)


def _to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """``ToTensor`` and ImageNet ``Normalize`` (same float ops, so same bits) of an RGB or L image. (3, S, S)"""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (S, S, 3) or (S, S)
    if pixels.ndim == 2:
        pixels = pixels.unsqueeze(2).expand(-1, -1, 3)  # L -> RGB as convert("RGB"): (S, S, 3)
    image = pixels.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)  # (3, S, S)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=image.dtype).view(-1, 1, 1)
    return image.sub_(mean).div_(std)


class MVTecDataset(Dataset):
    """Items: image (3, S, S) float ImageNet-normalised, mask (S, S) uint8, label, index.

    The mask is the resized and cropped ground truth as 0..255 (the original's float mask times
    255, exactly): a pixel is anomalous where it is 255, i.e. where the original's float mask is 1.0.
    """

    def __init__(self, samples: list[Sample], resize: int, imagesize: int) -> None:
        self.samples = samples
        self.imagesize = imagesize
        self.geometry = _ResizeCrop(resize, imagesize)

    def __len__(self) -> int:
        return len(self.samples)

    def display_image(self, index: int) -> np.ndarray:
        """The image as the backbone saw it (resized and cropped), un-normalised. (S, S, 3) uint8"""
        image = self.geometry(_open(self.samples[index].image, _IMAGE_MODES))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        sample = self.samples[index]
        image = _open(sample.image, _IMAGE_MODES)
        if sample.mask is None:
            mask = torch.zeros(self.imagesize, self.imagesize, dtype=torch.uint8)
        else:
            mask_img = _open(sample.mask, ("L",))
            if mask_img.size != image.size:
                raise DataError(
                    f"mask {sample.mask} is {mask_img.size[0]}x{mask_img.size[1]}, "
                    f"its image {sample.image} {image.size[0]}x{image.size[1]}"
                )
            mask = torch.from_numpy(np.array(self.geometry(mask_img), dtype=np.uint8))  # (S, S)
        return _to_normalized_tensor(self.geometry(image)), mask, sample.label, index


# Freed image buffers PIL keeps for the next image in a worker. PIL hands every buffer back to the
# C library by default, and in a forked worker a 1024² RGB image's 4 MiB came back as fresh pages
# every time: with 4 kept, the workers' page faults per image went 1,621 -> 355 and their CPU 29.5
# -> 26.0 ms (benchmarks/bench_data.py, loader passes). An item uses about 4 buffers at a time (the
# decoded image and mask, a resize's intermediate and output; 2 kept buffers saved nothing in a
# single-process trial). A block is at most PIL's block size (16 MiB), in practice an image's size,
# and stays in the worker.
PIL_CACHED_BLOCKS = 4


def _init_worker(niceness: int, idle: bool, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: raise this worker's nice value by ``niceness``; with ``idle``,
    move it to Linux's SCHED_IDLE policy where the system has it and allows it (else the nice value
    alone stands); let PIL reuse its image buffers (``PIL_CACHED_BLOCKS``). All of it is the
    worker's own setting: the main process keeps its priority and PIL's defaults."""
    if niceness:
        os.nice(niceness)
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # a sandbox may forbid it: the nice value still lowers the worker's priority
            pass
    core = Image.core
    if hasattr(core, "set_blocks_max"):  # Pillow's arena (PILLOW_BLOCKS_MAX); never absent in Pillow >= 4.3
        core.set_blocks_max(max(core.get_blocks_max(), PIL_CACHED_BLOCKS))


class MVTecDataModule(L.LightningDataModule):
    """MVTec AD categories, evaluated one after another (``select`` picks the current one).

    Args:
        root: folder holding one subfolder per category (the MVTec AD root).
        categories: categories to evaluate, in order, e.g. ``[bottle, cable]``.
        resize: shorter image side after resizing (bilinear), before the center crop.
        imagesize: side of the square center crop fed to the backbone.
        batch_size: images per batch.
        num_workers: data loading processes (0 loads in the main process).
        worker_niceness: added to the workers' nice value (``os.nice``) when the model runs on the
            CPU, so that image decoding takes the cores when the backbone's threads leave them idle
            instead of preempting them (on a few cores, a preempted thread stalls all the others at
            the next barrier). 0 keeps the workers at the main process's priority. The default, the
            lowest priority (19), ran the CLI's test loop 13 % faster than 10 on 2 cores with 1024²
            PNGs (166-170 vs 192-196 ms per image, alternating runs).
        worker_idle_policy: on the CPU, also run the workers under Linux's SCHED_IDLE scheduling
            policy (elsewhere, or where it is not permitted, the nice value alone): a worker then
            gets a core only while no thread of the model wants it, and is preempted at once when
            one does (a nice-19 worker may keep a core for a while, most likely holding up one of
            the model's threads inside a parallel region while the other waits). In one process
            with alternating passes on 2 cores it ran the test loop faster in 7 of 9 pairs
            (medians 186 vs 198 ms per image). On a machine busy with other work, idle-policy
            workers (like nice-19 ones, only more so) get little CPU: set this false and lower
            ``worker_niceness`` there.
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
        worker_niceness: int = 19,
        worker_idle_policy: bool = True,
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
        if not 0 <= worker_niceness <= 19:
            raise ValueError(f"data.worker_niceness must be in 0..19, got {worker_niceness}")
        self.root = root
        self.categories = list(categories)
        self.resize = resize
        self.imagesize = imagesize
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.worker_niceness = worker_niceness
        self.worker_idle_policy = worker_idle_policy
        self.synthetic = synthetic
        self.predict_dir = predict_dir
        self.predict_dataset = None
        self.category = self.categories[0]
        self.test_dataset: MVTecDataset | None = None
        self.train_dataset: MVTecDataset | None = None

    @property
    def dataset_name(self) -> str:
        return f"mvtec_{self.category}"

    def select(self, category: str) -> None:
        """Make ``category`` the one the dataloaders serve; datasets are rebuilt in ``setup``."""
        if category not in self.categories:
            raise ValueError(f"category {category!r} is not in data.categories {self.categories}")
        self.category = category
        self.test_dataset = self.train_dataset = None

    def dataset(self, split: str) -> MVTecDataset:
        return MVTecDataset(list_samples(self.root, self.category, split), self.resize, self.imagesize)

    def prepare_data(self) -> None:
        if self.synthetic:
            from .synthetic import make_synthetic_mvtec

            make_synthetic_mvtec(self.root, tuple(self.categories))

    def setup(self, stage: str) -> None:
        if stage in ("test", "validate") and self.test_dataset is None:
            self.test_dataset = self.dataset("test")
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self.dataset("train")
        if stage == "predict" and self.predict_dataset is None:
            from .folder import ImageFolderDataset

            if not self.predict_dir:
                raise DataError("predict needs data.predict_dir: the folder of images to score")
            self.predict_dataset = ImageFolderDataset(self.predict_dir, self.resize, self.imagesize)

    def _loader(self, dataset: Dataset, shard: bool = False) -> DataLoader:
        sampler = None
        trainer = self.trainer
        if shard and trainer is not None and trainer.world_size > 1:
            # Every image exactly once across ranks (Lightning's DistributedSampler would pad by
            # repeating images), and in the very batch a single process would put it in: rank r
            # takes batches r, r + W, r + 2W, ... of the single-process order. Kernels (a CPU
            # convolution, a BLAS product) may round differently for another batch composition;
            # this way every image's scores are bit for bit those of one process.
            B, W, N = self.batch_size, trainer.world_size, len(dataset)
            sampler = [i for k in range(trainer.global_rank, -(-N // B), W) for i in range(k * B, min((k + 1) * B, N))]
        strategy = getattr(trainer, "strategy", None)
        on_cpu = strategy is None or strategy.root_device.type == "cpu"
        niceness = self.worker_niceness if on_cpu else 0
        idle = self.worker_idle_policy and on_cpu
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(_init_worker, niceness, idle) if self.num_workers > 0 else None,
        )

    def test_dataloader(self) -> DataLoader:
        assert self.test_dataset is not None, "setup('test') first"
        return self._loader(self.test_dataset, shard=True)

    def predict_dataloader(self) -> DataLoader:
        assert self.predict_dataset is not None, "setup('predict') first"
        return self._loader(self.predict_dataset, shard=True)

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "setup('fit') first"
        return self._loader(self.train_dataset)
