"""Datasets: known pixel values, captions that agree with pixels, files found (or a clear error)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError
from lab_utils.core.data import (
    DATASETS,
    CIFAR10Dataset,
    CorruptData,
    DataNotFound,
    FashionMNISTDataset,
    MNISTDataset,
    ShapesDataset,
    build_dataset,
    build_vocab,
    dataset_class,
    words,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


# --- captions and registry ------------------------------------------------------------------
def test_words_and_vocab():
    assert words("A small, RED t-shirt/top!") == ["a", "small", "red", "t", "shirt", "top"]
    assert build_vocab(["b a", "A c, b"]) == ["[PAD]", "[UNK]", "[CLS]", "a", "b", "c"]


def test_registry_and_unknown_name():
    assert set(DATASETS) == {"shapes", "fashion_mnist", "mnist", "cifar10"}
    assert dataset_class("shapes") is ShapesDataset
    with pytest.raises(ConfigError, match="valid names: shapes, fashion_mnist, mnist, cifar10"):
        dataset_class("shapez")


# --- shapes -----------------------------------------------------------------------------------
def shapes(tmp_path: Path, split: str = "train", **overrides) -> ShapesDataset:
    return ShapesDataset(ShapesDataset.Config(cache_dir=str(tmp_path), **overrides), split)


@pytest.fixture(scope="module")
def shapes_test(tmp_path_factory) -> ShapesDataset:
    """The default test split (2000 items, held-out combinations included)."""
    return shapes(tmp_path_factory.mktemp("shapes"), "test")


def test_shapes_items_and_collate(tmp_path):
    dataset = shapes(tmp_path, subset=16)
    item = dataset[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert isinstance(item["caption"], str) and item["labels"].shape == (4,)
    batch = next(iter(DataLoader(dataset, batch_size=8)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["labels"].shape == (8, 4)
    assert len(batch["caption"]) == 8
    assert list(dataset.attributes) == ["shape", "colour", "size", "position"]
    assert len(dataset) == 16 and dataset.split == "train" and dataset.channels == 3


def test_shapes_deterministic_per_seed(tmp_path):
    first = shapes(tmp_path / "a", num_train=200)
    again = shapes(tmp_path / "b", num_train=200)
    other = shapes(tmp_path / "c", num_train=200, seed=1)
    assert torch.equal(first.pixels, again.pixels) and torch.equal(first.labels, again.labels)
    assert [first.caption(i) for i in range(50)] == [again.caption(i) for i in range(50)]
    assert not torch.equal(first.pixels, other.pixels)
    assert [first.caption(i) for i in range(50)] != [other.caption(i) for i in range(50)]


def test_shapes_cache_round_trip(tmp_path):
    built = shapes(tmp_path, num_train=300)
    assert not built.loaded_from_cache and built.cache_path.exists()
    loaded = shapes(tmp_path, num_train=300)
    assert loaded.loaded_from_cache
    assert torch.equal(built.pixels, loaded.pixels) and torch.equal(built.labels, loaded.labels)
    assert [p.name for p in tmp_path.iterdir()] == [built.cache_path.name]  # no temp file left
    assert not shapes(tmp_path, num_train=300, seed=5).loaded_from_cache  # the key covers the seed


def test_shapes_subset_is_prefix_of_full_split(tmp_path):
    full = shapes(tmp_path / "full", num_train=1500)  # 1500 > block_size: crosses a block boundary
    part = shapes(tmp_path / "part", num_train=1500, subset=1200)
    assert len(part) == 1200 and part.cache_path is None  # generated, not cached
    assert torch.equal(part.pixels, full.pixels[:1200]) and torch.equal(part.labels, full.labels[:1200])
    from_cache = shapes(tmp_path / "full", num_train=1500, subset=10)
    assert from_cache.loaded_from_cache and torch.equal(from_cache.pixels, full.pixels[:10])


def parse_caption(caption: str, attributes: dict[str, list[str]]) -> dict[str, str]:
    """Attribute values named in a caption, longest values first ("top left" before "top")."""
    text = f" {' '.join(words(caption))} "
    found = {}
    values = sorted(((v, a) for a, vs in attributes.items() for v in vs), key=lambda p: -len(p[0]))
    for value, attribute in values:
        if f" {value} " in text:
            assert attribute not in found, f"{caption!r} names two {attribute}s"
            found[attribute] = value
            text = text.replace(f" {value} ", " | ")
    return found


def test_shapes_captions_agree_with_pixels(shapes_test):
    dataset, cfg, size = shapes_test, shapes_test.cfg, shapes_test.image_size
    palette = torch.tensor(list(dataset.palette.values()), dtype=torch.float32)  # (K, 3)
    grid = torch.tensor([cfg.position_margin, 0.5, 1 - cfg.position_margin]) * size
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    areas = {"small": [], "large": []}
    for index in range(400):
        labels = dataset.labels[index]
        names = dict(zip(dataset.attributes, (v[k] for v, k in zip(dataset.attributes.values(), labels))))
        found = parse_caption(dataset.caption(index), dataset.attributes)
        assert found["shape"] == names["shape"] and found["colour"] == names["colour"]
        for optional in ("size", "position"):  # partial captions may leave these out
            assert found.get(optional, names[optional]) == names[optional]
        assert parse_caption(dataset.describe(labels), dataset.attributes) == names

        pixels = dataset.pixels[index].float()  # (3, S, S) in 0..255
        difference = (pixels - cfg.background).amax(0)  # (S, S): proportional to coverage
        coverage = difference / difference.max()
        # colour: the mean of fully covered pixels is nearest to the named palette colour
        mean_rgb = pixels[:, coverage > 0.95].mean(1)  # (3,)
        nearest = int(((palette - mean_rgb) ** 2).sum(1).argmin())
        assert list(dataset.palette)[nearest] == names["colour"], index
        # position: the coverage-weighted centroid is nearest to the named grid cell's centre
        cy = (coverage.sum(1) * coords).sum() / coverage.sum()
        cx = (coverage.sum(0) * coords).sum() / coverage.sum()
        row, col = int((grid - cy).abs().argmin()), int((grid - cx).abs().argmin())
        assert dataset.attributes["position"][3 * row + col] == names["position"], index
        areas[names["size"]].append(float(coverage.sum()))
        # shape: which corners of the bounding box are covered (square: all four; upward
        # triangle: the bottom two; circle: none). Clear-cut for large shapes.
        if names["size"] == "large":
            rows = (coverage > 0.5).any(1).nonzero()[:, 0]
            cols = (coverage > 0.5).any(0).nonzero()[:, 0]
            top = coverage[rows.min(), cols[[0, -1]]].mean()
            bottom = coverage[rows.max(), cols[[0, -1]]].mean()
            guess = "square" if top > 0.25 else "triangle" if bottom > 0.25 else "circle"
            assert guess == names["shape"], index
    assert max(areas["small"]) < min(areas["large"])  # every large shape covers more pixels


def test_shapes_held_out_combinations(tmp_path, shapes_test):
    train = shapes(tmp_path, num_train=3000)
    shape, colour = train.attributes["shape"], train.attributes["colour"]

    def combination(dataset, shape_name, colour_name):  # (N,) bool, computed from the labels
        return (dataset.labels[:, 0] == shape.index(shape_name)) & (dataset.labels[:, 1] == colour.index(colour_name))

    for dataset in (train, shapes_test):
        expected = combination(dataset, "triangle", "blue") | combination(dataset, "circle", "green")
        assert torch.equal(dataset.held_out_mask, expected)
    assert not train.held_out_mask.any()  # excluded from train ...
    assert combination(shapes_test, "triangle", "blue").sum() > 20  # ... present in test
    assert combination(shapes_test, "circle", "green").sum() > 20
    assert bool(train.is_held_out(torch.tensor([2, 5, 1, 4])))  # a large blue triangle, center
    assert not bool(train.is_held_out(torch.tensor([2, 0, 1, 4])))  # a large red triangle


def test_shapes_held_out_parsing_and_errors(tmp_path):
    dataset = shapes(tmp_path, subset=4, held_out=["large blue triangle at the top left"])
    assert dataset.held_out == [{0: 2, 1: 5, 2: 1, 3: 0}]  # "top left" is one value, not "top" + "left"
    with pytest.raises(ValueError, match="held_out entry 'blu triangle': unknown word 'blu'; known values"):
        ShapesDataset.Config(held_out=["blu triangle"])
    with pytest.raises(ValueError, match="names 'colour' twice"):
        ShapesDataset.Config(held_out=["red blue circle"])
    with pytest.raises(ValueError, match="leaves no combination"):
        ShapesDataset.Config(held_out=["small", "large"])
    assert ShapesDataset.Config(held_out=[]).held_out == []  # nothing held out is fine


def test_shapes_corpus_vocab_and_prompts(shapes_test):
    corpus = set(shapes_test.caption_corpus())
    captions = {shapes_test.caption(i) for i in range(300)}
    assert captions <= corpus
    assert len({len(words(c)) for c in captions}) >= 5  # several templates and lengths in use
    info = shapes_test.data_info()
    assert info.vocab[:3] == ["[PAD]", "[UNK]", "[CLS]"] and info.vocab[3:] == sorted(info.vocab[3:])
    assert info.channels == 3 and info.image_size == 32 and info.attributes == shapes_test.attributes
    prompts = shapes_test.default_prompts()
    assert len(prompts) >= 8 and set(prompts) <= corpus  # every prompt is in-distribution text
    assert "a red circle" in prompts and "an orange circle at the bottom left" in corpus
    assert shapes_test.describe([0, 0, 0, 0]) == "a small red circle at the top left"
    assert shapes_test.describe([1, 4, 1, 4], template=1) == "cyan square, large, center"


# --- IDX datasets (Fashion-MNIST, MNIST) ---------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """A valid IDX file: two zero bytes, dtype 0x08 (uint8), ndim, big-endian sizes, data."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if gz else open)(path.with_name(path.name + (".gz" if gz else "")), "wb").write(raw)


def write_idx_split(folder: Path, prefix: str, gz: bool) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0] = 255  # one white pixel in the corner
    images[1] = 255  # all white
    images[2] = 51  # 51 / 127.5 - 1 = -0.6
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.array([7, 9, 0], dtype=np.uint8), gz)


@pytest.mark.parametrize("cls", [FashionMNISTDataset, MNISTDataset])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_loads_known_pixels(tmp_path, cls, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / cls.torchvision_name / "raw"
    write_idx_split(folder, "t10k", gz)
    dataset = build_dataset({"name": cls.name, "root": str(tmp_path), "system_dirs": []}, "test")
    assert len(dataset) == 3 and dataset.source == folder
    corner, white, grey = (dataset[i]["image"] for i in range(3))
    assert corner.shape == (1, 32, 32)
    assert corner[0, 2, 2] == 1.0 and corner[0, 2, 3] == -1.0  # 255 -> 1, 0 -> -1, shifted by the pad
    assert torch.all(white[0, 2:30, 2:30] == 1.0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(white[0][border] == -1.0)  # the 2-pixel padding is background
    assert torch.allclose(grey[0, 2:30, 2:30], torch.tensor(-0.6))
    assert dataset.labels[:, 0].tolist() == [7, 9, 0]
    names = next(iter(cls.attributes.values()))
    caption = set(words(dataset.caption(0)))
    assert set(words(names[7])) <= caption or "7" in caption  # "a handwritten seven", "the number 7"
    if cls is FashionMNISTDataset:
        assert dataset.describe([7]) == "a photo of a sneaker" and dataset.describe([9]) == "a photo of an ankle boot"
    else:
        assert dataset.describe([7]) == "a handwritten digit seven" and dataset.describe([7], 1) == "the number 7"


def test_idx_resize_and_subset(tmp_path):
    write_idx_split(tmp_path, "train", gz=False)
    dataset = build_dataset({"name": "mnist", "root": str(tmp_path), "image_size": 16, "subset": 2}, "train")
    assert len(dataset) == 2 and dataset[1]["image"].shape == (1, 16, 16)


def test_idx_missing_files_names_every_way(tmp_path):
    with pytest.raises(DataNotFound) as error:
        build_dataset({"name": "fashion_mnist", "root": str(tmp_path), "system_dirs": [str(tmp_path / "sys")]}, "train")
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    for expected in ("data.root=", "apt-get install dataset-fashion-mnist", "data.download=true",
                     str(tmp_path / "FashionMNIST" / "raw"), str(tmp_path / "sys"), "train-images-idx3-ubyte"):
        assert expected in message


@pytest.mark.parametrize("damage", ["magic", "truncated", "truncated_gz"])
def test_idx_corrupt_file_is_named(tmp_path, damage):
    write_idx_split(tmp_path, "t10k", gz=damage == "truncated_gz")
    images = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if damage == "truncated_gz" else ""))
    raw = images.read_bytes()
    images.write_bytes(b"\x12\x34" + raw[2:] if damage == "magic" else raw[: len(raw) // 2])
    with pytest.raises(CorruptData, match=str(images)):
        build_dataset({"name": "mnist", "root": str(tmp_path)}, "test")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_test_split():
    dataset = build_dataset({"name": "fashion_mnist", "root": "/nonexistent"}, "test")
    assert len(dataset) == 10000 and dataset.source == DEBIAN_FASHION
    assert set(dataset.labels[:, 0].tolist()) == set(range(10))
    assert dataset[0]["image"].shape == (1, 32, 32)


# --- CIFAR-10 ----------------------------------------------------------------------------------
def test_cifar10_plane_order_and_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[0, :1024] = 255  # item 0: the R plane full, G and B empty -> pure red
    data[1, 1024 + 5] = 255  # item 1: G at row 0, column 5
    data[1, 2048 + 32] = 255  # item 1: B at row 1, column 0
    for name, labels in [("test_batch", [3, 8])] + [(f"data_batch_{k}", [k, 0]) for k in range(1, 6)]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
    test = build_dataset({"name": "cifar10", "root": str(tmp_path)}, "test")
    red, dots = test[0]["image"], test[1]["image"]
    assert red.shape == (3, 32, 32)
    assert torch.all(red[0] == 1) and torch.all(red[1:] == -1)
    assert dots[1, 0, 5] == 1 and dots[2, 1, 0] == 1 and dots[0].max() == -1
    assert dots.sum() == -3 * 32 * 32 + 4  # exactly two pixels raised from -1 to 1
    assert test.labels[:, 0].tolist() == [3, 8] and test.describe([3]) == "a photo of a cat"
    train = build_dataset({"name": "cifar10", "root": str(tmp_path)}, "train")
    assert len(train) == 10 and train.labels[::2, 0].tolist() == [1, 2, 3, 4, 5]


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(DataNotFound, match="data.download=true"):
        CIFAR10Dataset(CIFAR10Dataset.Config(root=str(tmp_path)), "test")


# --- config schemas ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_data_yaml_composes_against_its_schema(name):
    cfg = compose([f"data={name}", "data.subset=256"], config_name="dataview")
    assert cfg.data.name == name and cfg.data.subset == 256


@pytest.mark.parametrize("override, message", [
    ("data.image_size=3", "image_size"),
    ("+data.colour=red", "colour"),
    ("data.held_out=[blu triangle]", "unknown word 'blu'"),
    ("data.subset=0", "subset"),
])
def test_bad_data_config_raises_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["data=shapes", override], config_name="dataview")


def test_build_dataset_accepts_composed_config_and_dataclass(tmp_path):
    cfg = compose(["data=shapes", "data.subset=8", f"data.cache_dir={tmp_path}"], config_name="dataview")
    from_dictconfig = build_dataset(cfg.data, "test")
    from_dataclass = build_dataset(ShapesDataset.Config(subset=8, cache_dir=str(tmp_path)), "test")
    assert torch.equal(from_dictconfig.pixels, from_dataclass.pixels) and len(from_dataclass) == 8
    direct = ShapesDataset(cfg.data, "test")  # a class also takes cfg.data (checked by its schema)
    assert isinstance(direct.cfg, ShapesDataset.Config) and torch.equal(direct.pixels, from_dataclass.pixels)
    with pytest.raises(ConfigError, match="num_test"):
        build_dataset({"name": "shapes", "num_test": 0}, "test")
