"""MVTec loading: order, mask pairing and values, errors that name the file, sharding."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from torchvision import transforms

from patchcore_lightning.data.datamodule import AnomalyDataModule, shard_batches
from patchcore_lightning.data.images import PADDING_INDEX, DataError
from patchcore_lightning.data.mvtec import MVTecDataset, list_samples
from patchcore_lightning.data.synthetic import make_synthetic_mvtec

from .conftest import make_mvtec_tree


def test_order_labels_and_masks(mvtec_root):
    samples = list_samples(mvtec_root, "alpha")
    assert [f"{s.anomaly}/{s.image.name}" for s in samples] == [
        "crack/000.png", "crack/001.png", "good/000.png", "good/001.png", "good/002.png", "stain/000.png", "stain/001.png",
    ]
    assert [s.label for s in samples] == [1, 1, 0, 0, 0, 1, 1]
    assert samples[0].mask.name == "000_mask.png" and samples[2].mask is None
    dataset = MVTecDataset(samples, resize=72, imagesize=64)
    image, mask, label, index = dataset[1]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.uint8
    # the mask is the original's float mask times 255, exactly
    t = transforms.Compose([transforms.Resize(72), transforms.CenterCrop(64), transforms.ToTensor()])
    original = t(Image.open(samples[1].mask))[0]
    assert torch.equal(mask.float() / 255, original)  # ToTensor's uint8 -> float32 / 255, correctly rounded
    assert ((mask > 0) & (mask < 255)).any(), "resizing makes soft edges the metrics must not count"
    assert dataset[3][1].sum() == 0 and (label, index) == (1, 1)


def test_errors_name_what_is_wrong(tmp_path):
    root = make_mvtec_tree(tmp_path / "d", categories=("c",), size=32, n_train=1, n_good=1, n_per_defect=1)
    with pytest.raises(DataError, match="data root not found"):
        list_samples(tmp_path / "missing", "c")
    with pytest.raises(DataError, match=r"category folder not found: .*zz \(categories in .*\['c'\]\)"):
        list_samples(root, "zz")
    (root / "c" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"no ground-truth mask for test/crack/000.png"):
        list_samples(root, "c")
    shutil.rmtree(root / "c" / "test")
    with pytest.raises(DataError, match="no test/ folder"):
        list_samples(root, "c")


def test_unreadable_image_and_mask_size_mismatch(tmp_path):
    root = make_mvtec_tree(tmp_path / "d", categories=("c",), size=32, n_train=1, n_good=1, n_per_defect=1)
    samples = list_samples(root, "c")
    dataset = MVTecDataset(samples, 32, 32)
    Image.new("L", (16, 16)).save(samples[0].mask)
    with pytest.raises(DataError, match=r"mask .*000_mask.png is 16x16, its image .*000.png 32x32"):
        dataset[0]
    data = samples[1].image.read_bytes()
    samples[1].image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*good/000.png: .*truncated"):
        dataset[1]


def test_datamodule_validates_and_generates_synthetic_data(tmp_path):
    with pytest.raises(ValueError, match="lists a category twice"):
        AnomalyDataModule(categories=["a", "a"])
    with pytest.raises(ValueError, match="resize=100, imagesize=128"):
        AnomalyDataModule(resize=100, imagesize=128)
    dm = AnomalyDataModule(root=str(tmp_path / "syn"), categories=["tiles"], resize=40, imagesize=32, synthetic=True)
    dm.prepare_data()
    dm.setup("test")
    assert dm.dataset_name == "mvtec_tiles" and len(dm.test_dataset) == 6 + 3 * 3
    first = (tmp_path / "syn" / "tiles" / "test" / "hole" / "000.png").read_bytes()
    shutil.rmtree(tmp_path / "syn")
    make_synthetic_mvtec(tmp_path / "syn", ("tiles",))
    assert (tmp_path / "syn" / "tiles" / "test" / "hole" / "000.png").read_bytes() == first  # deterministic


def test_ddp_shards_are_whole_single_process_batches():
    class _Trainer:
        world_size, global_rank, num_devices = 3, 0, 3
        strategy = type("S", (), {"root_device": torch.device("cpu")})()

    dm = AnomalyDataModule(categories=["x"], batch_size=2, num_workers=0)
    seen = []
    for rank in range(3):
        _Trainer.global_rank = rank
        dm.trainer = _Trainer()
        loader = dm._loader(list(range(11)))
        seen.append([batch.tolist() for batch in loader])
    assert seen == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10]]]
    assert shard_batches(11, 2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]  # one process: every batch
    # 7 batches on 3 ranks: every rank runs 3 batches (Lightning's training loop syncs at every batch)
    assert [shard_batches(13, 2, r, 3) for r in range(3)] == [
        [[0, 1], [6, 7], [12]], [[2, 3], [8, 9], [PADDING_INDEX]], [[4, 5], [10, 11], [PADDING_INDEX]]
    ]


def test_a_rank_without_images_gets_a_placeholder_batch(mvtec_root):
    assert [shard_batches(2, 2, rank, 3) for rank in range(3)] == [[[0, 1]], [[PADDING_INDEX]], [[PADDING_INDEX]]]
    dataset = MVTecDataset(list_samples(mvtec_root, "alpha"), 72, 64)
    image, mask, label, index = dataset[PADDING_INDEX]  # not the last sample, as a plain negative index would be
    assert index == PADDING_INDEX and not image.any() and not mask.any() and image.shape == (3, 64, 64)


class _WhoRead(torch.utils.data.Dataset):
    """Items of 0..n-1 that say which DataLoader worker read them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        info = torch.utils.data.get_worker_info()
        return torch.full((2,), float(index)), index, "main" if info is None else f"worker{info.id}"


def test_every_worker_reads_items_of_one_batch():
    from patchcore_lightning.data.datamodule import ItemwiseLoader, ShardBatches

    # one batch of 8 items and 2 workers: a DataLoader gives it to one worker, here both read
    (images, indices, readers), = list(ItemwiseLoader(_WhoRead(8), ShardBatches(8, 8), num_workers=2))
    assert indices.tolist() == list(range(8)) and torch.equal(images[:, 0], torch.arange(8.0))
    assert set(readers) == {"worker0", "worker1"}


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("rank", [0, 1])
def test_itemwise_batches_equal_the_plain_dataloaders(tmp_path, mvtec_root, workers, rank):
    """The same batches as a DataLoader with the same batch sampler: items, order, pixels, types,
    for the test data (a DDP rank's shard, placeholders included) and a predict folder (an unreadable file)."""
    from patchcore_lightning.data.datamodule import ItemwiseLoader, ShardBatches
    from patchcore_lightning.data.folder import ImageFolderDataset

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, path in enumerate(sorted((mvtec_root / "beta" / "test").rglob("*.png"))):
        shutil.copy(path, folder / f"{i:02d}.png")
    (folder / "99.png").write_bytes(b"not a png")
    datasets = [MVTecDataset(list_samples(mvtec_root, "beta"), 72, 64), ImageFolderDataset(folder, 72, 64)]
    for dataset in datasets:
        sampler = ShardBatches(len(dataset), 3, rank, 2)
        plain = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers))
        ours = list(ItemwiseLoader(dataset, batch_sampler=sampler, num_workers=workers))
        assert len(ours) == len(plain) == len(sampler)
        for a, b in zip(plain, ours):
            assert type(a) is type(b) and len(a) == len(b)
            for x, y in zip(a, b):
                assert type(x) is type(y)
                if isinstance(x, torch.Tensor):
                    assert x.dtype == y.dtype and torch.equal(x, y)
                else:
                    assert x == y
