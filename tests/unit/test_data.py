"""Datasets as uint8 splits, and byte-exact augmentation replay (trainer/data.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits

from trainer.data import (
    DATASET_NAMES,
    DatasetNotFoundError,
    ImageTensorDataset,
    PadCrop,
    ReplayedViews,
    describe,
    load_dataset,
    normalize,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16, seed=0)


def random_images(count: int, size: int = 8, seed: int = 0) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return ImageTensorDataset(images, torch.arange(count) % 3)


# ---- digits ----------------------------------------------------------------------------------------------


def test_digits_splits_have_uint8_three_channel_images_and_add_up(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1221, 216, 360)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    image, label = digits.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert isinstance(label, int) and 0 <= label < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grayscale replicated
    assert (digits.num_classes, digits.in_chans, digits.image_size, digits.name) == (10, 3, 16, "digits")
    assert digits.class_names == tuple(str(d) for d in range(10))


def test_digits_splits_are_disjoint_and_stratified(digits):
    splits = {"train": digits.train.indices, "val": digits.val.indices, "test": digits.test.indices}
    all_indices = np.concatenate(list(splits.values()))
    assert len(np.unique(all_indices)) == 1797
    labels = load_digits().target
    overall = Counter(labels.tolist())
    for name, indices in splits.items():
        counts = Counter(labels[indices].tolist())
        share = len(indices) / 1797
        for digit, total in overall.items():
            assert abs(counts[digit] / total - share) < 0.02, (name, digit)


def test_digits_split_is_deterministic_per_seed(digits):
    again = load_dataset("digits", image_size=16, seed=0)
    other = load_dataset("digits", image_size=16, seed=1)
    assert np.array_equal(again.train.indices, digits.train.indices)
    assert np.array_equal(again.test.indices, digits.test.indices)
    assert torch.equal(again.train[5][0], digits.train[5][0])
    assert not np.array_equal(other.test.indices, digits.test.indices)


def test_digits_mean_and_std_are_the_train_pixels_statistics(digits):
    pixels = torch.stack([digits.train[i][0] for i in range(len(digits.train))]).double() / 255
    assert digits.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert digits.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    assert 0.1 < digits.mean[0] < 0.6 and 0.1 < digits.std[0] < 0.5


def test_digits_at_native_size_keeps_the_scaled_pixels():
    native = load_dataset("digits", image_size=8, seed=0)
    image, _ = native.test[0]
    values = set(image.unique().tolist())
    assert values <= {round(k * 255 / 16) for k in range(17)}  # 0..16 counts scaled to 0..255, no resampling


# ---- normalize, describe, argument errors ----------------------------------------------------------------


def test_normalize_maps_uint8_to_standardized_float32():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 1, 1)
    out = normalize(images, mean=(0.0, 0.2, 0.5), std=(1.0, 0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 1)
    assert out[0].flatten().tolist() == pytest.approx([0.0, 0.0, 2.0])


def test_normalize_rejects_float_input_and_wrong_channel_count():
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="one per channel"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), (0.5,), (0.5,))


def test_describe_is_one_line_with_sizes_and_shape(digits):
    line = describe(digits)
    assert "\n" not in line
    assert line == "digits: 1221 train / 216 val / 360 test, 10 classes, 3x16x16 uint8"


def test_unknown_dataset_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as error:
        load_dataset("mnist", image_size=16, seed=0)
    for name in DATASET_NAMES:
        assert name in str(error.value)


def test_fractions_outside_their_ranges_are_rejected():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", image_size=16, seed=0, val_fraction=1.0)
    with pytest.raises(ValueError, match="train_fraction"):
        load_dataset("digits", image_size=16, seed=0, train_fraction=0.0)


def test_val_fraction_zero_trains_on_the_whole_training_split():
    full = load_dataset("digits", image_size=16, seed=0, val_fraction=0.0)
    held = load_dataset("digits", image_size=16, seed=0)
    assert len(full.val) == 0
    assert len(full.train) == len(held.train) + len(held.val)
    assert full.test.indices.tolist() == held.test.indices.tolist()


def test_train_fraction_keeps_a_seeded_stratified_nested_subset():
    full = load_dataset("digits", image_size=16, seed=0, val_fraction=0.0)
    tenth = load_dataset("digits", image_size=16, seed=0, val_fraction=0.0, train_fraction=0.1)
    again = load_dataset("digits", image_size=16, seed=0, val_fraction=0.0, train_fraction=0.1)
    quarter = load_dataset("digits", image_size=16, seed=0, val_fraction=0.0, train_fraction=0.25)
    other_seed = load_dataset("digits", image_size=16, seed=1, val_fraction=0.0, train_fraction=0.1)
    kept = set(tenth.train.indices.tolist())
    assert kept == set(again.train.indices.tolist())  # every experiment and teacher: the same subset
    assert kept <= set(quarter.train.indices.tolist()) <= set(full.train.indices.tolist())
    assert kept != set(other_seed.train.indices.tolist())
    assert tenth.test.indices.tolist() == full.test.indices.tolist()  # the held-out split does not move
    labels = full.train.dataset.labels
    for label in range(10):  # each class keeps its share
        of_class = (labels[full.train.indices] == label).sum().item()
        assert (labels[tenth.train.indices] == label).sum().item() == max(1, round(0.1 * of_class))


# ---- fake ------------------------------------------------------------------------------------------------


def test_fake_dataset_is_uint8_deterministic_and_sized_by_fake_samples():
    fake = load_dataset("fake", image_size=12, seed=3, fake_samples=40)
    assert (len(fake.train), len(fake.val), len(fake.test)) == (27, 5, 8)
    image, label = fake.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 12) and 0 <= label < 10
    again = load_dataset("fake", image_size=12, seed=3, fake_samples=40)
    assert torch.equal(again.test[7][0], fake.test[7][0])
    assert not torch.equal(fake.train[0][0], fake.val[0][0])  # splits come from disjoint FakeData offsets
    assert fake.num_classes == 10 and len(fake.mean) == 3


# ---- replay ----------------------------------------------------------------------------------------------


def view_bytes(views: ReplayedViews, index: int) -> bytes:
    return views[index][0].numpy().tobytes()


def test_replayed_view_is_a_zero_padded_crop_of_the_image():
    dataset = random_images(6)
    views = ReplayedViews(dataset, seed=0, views=4, maker=PadCrop(2, False))
    for index in range(6):
        image = dataset[index][0]
        padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
        candidates = [padded[:, top : top + 8, left : left + 8] for top in range(5) for left in range(5)]
        for view in range(4):
            assert any(torch.equal(views.view(index, view), crop) for crop in candidates)


def test_replay_returns_view_label_index_and_view_number():
    views = ReplayedViews(random_images(4), seed=1, views=3, maker=PadCrop(1, True))
    views.set_epoch(5)
    image, label, index, view = views[2]
    assert (label, index, view) == (2, 2, 2)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert torch.equal(image, views.view(2, 2))


def test_epochs_e_and_e_plus_v_give_identical_bytes_and_instances_agree():
    dataset = random_images(8)
    first = ReplayedViews(dataset, seed=7, views=3, maker=PadCrop(2, True))
    second = ReplayedViews(dataset, seed=7, views=3, maker=PadCrop(2, True))
    for epoch in range(3):
        first.set_epoch(epoch)
        second.set_epoch(epoch + 3)
        for index in range(8):
            assert view_bytes(first, index) == view_bytes(second, index)


def test_different_views_and_seeds_usually_differ():
    dataset = random_images(20)
    views = ReplayedViews(dataset, seed=0, views=2, maker=PadCrop(2, True))
    other_seed = ReplayedViews(dataset, seed=1, views=2, maker=PadCrop(2, True))
    differs_by_view = sum(not torch.equal(views.view(i, 0), views.view(i, 1)) for i in range(20))
    differs_by_seed = sum(not torch.equal(views.view(i, 0), other_seed.view(i, 0)) for i in range(20))
    assert differs_by_view >= 17 and differs_by_seed >= 17


def test_hflip_flips_some_views_and_not_others():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(1, 3, 4, 4).repeat(30, 1, 1, 1)
    views = ReplayedViews(ImageTensorDataset(image, torch.zeros(30)), seed=0, views=1, maker=PadCrop(0, True))
    flipped = sum(torch.equal(views.view(i, 0), image[0].flip(-1)) for i in range(30))
    kept = sum(torch.equal(views.view(i, 0), image[0]) for i in range(30))
    assert flipped + kept == 30 and 5 <= flipped <= 25


@pytest.mark.parametrize("views,pad,hflip", [(0, 4, True), (5, 0, False)])
def test_no_augmentation_returns_the_image_itself(views, pad, hflip):
    dataset = random_images(3)
    replay = ReplayedViews(dataset, seed=0, views=views, maker=PadCrop(pad, hflip))
    replay.set_epoch(7)
    for index in range(3):
        image, label, returned_index, view = replay[index]
        assert torch.equal(image, dataset[index][0])
        assert (label, returned_index, view) == (index % 3, index, 0)


def test_replay_rejects_negative_arguments():
    with pytest.raises(ValueError, match="pad must be a non-negative int, got -1"):
        PadCrop(-1, False)
    with pytest.raises(ValueError, match="views must be a non-negative int, got -1"):
        ReplayedViews(random_images(1), seed=0, views=-1, maker=PadCrop(1, False))
    with pytest.raises(ValueError, match="epoch"):
        ReplayedViews(random_images(1), seed=0, views=2, maker=PadCrop(1, False)).set_epoch(-1)


def test_another_process_computes_the_same_view_bytes():
    views = ReplayedViews(random_images(5, seed=11), seed=123, views=4, maker=PadCrop(3, True))
    expected = {
        index: hashlib.sha256(views.view(index, view).numpy().tobytes()).hexdigest()
        for index, view in ((0, 1), (4, 3))
    }
    script = (
        "import hashlib, torch\n"
        "from trainer.data import ImageTensorDataset, PadCrop, ReplayedViews\n"
        "g = torch.Generator().manual_seed(11)\n"
        "images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=g)\n"
        "views = ReplayedViews(ImageTensorDataset(images, torch.arange(5) % 3), seed=123, views=4, "
        "maker=PadCrop(3, True))\n"
        "for index, view in ((0, 1), (4, 3)):\n"
        "    print(index, hashlib.sha256(views.view(index, view).numpy().tobytes()).hexdigest())\n"
    )
    # A different hash salt than this process's: the view must not depend on Python's hash().
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO_ROOT, env=env
    )
    computed = {int(index): digest for index, digest in (line.split() for line in result.stdout.splitlines())}
    assert computed == expected


# ---- cifar -----------------------------------------------------------------------------------------------


def write_pickle(path: Path, payload: dict) -> str:
    """Write one file of torchvision's CIFAR python format (a pickled dict); returns its md5."""
    path.write_bytes(pickle.dumps(payload, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar_root(root: Path, monkeypatch, dataset_class, per_class: int) -> np.ndarray:
    """A tiny local root in torchvision's CIFAR python layout; returns the test images' raw [N, 3072] rows.

    CIFAR-10 has five train batches and batches.meta; CIFAR-100 one `train` file, `fine_labels` and `meta`.
    torchvision checks each file's md5 against the real archive's; the test registers its own files' md5s
    instead, so torchvision's integrity check still runs on them.
    """
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    num_classes = 10 if dataset_class is torchvision.datasets.CIFAR10 else 100
    label_key = "labels" if num_classes == 10 else "fine_labels"
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    train_names = [name for name, _ in dataset_class.train_list]
    train_list = []
    for name, batch_labels in zip(train_names, np.array_split(labels, len(train_names))):
        data = rng.integers(0, 256, (len(batch_labels), 3072), dtype=np.uint8)
        payload = {"data": data, label_key: batch_labels.tolist()}
        train_list.append([name, write_pickle(folder / name, payload)])
    test_name = dataset_class.test_list[0][0]
    test_data = rng.integers(0, 256, (num_classes, 3072), dtype=np.uint8)
    test_md5 = write_pickle(folder / test_name, {"data": test_data, label_key: list(range(num_classes))})
    meta = dataset_class.meta
    class_names = [f"class{c}" for c in range(num_classes)]
    meta_md5 = write_pickle(folder / meta["filename"], {meta["key"]: class_names})
    monkeypatch.setattr(dataset_class, "train_list", train_list)
    monkeypatch.setattr(dataset_class, "test_list", [[test_name, test_md5]])
    monkeypatch.setattr(dataset_class, "meta", {**meta, "md5": meta_md5})
    return test_data


def test_cifar10_from_a_local_root(tmp_path, monkeypatch):
    test_rows = make_cifar_root(tmp_path, monkeypatch, torchvision.datasets.CIFAR10, per_class=4)
    cifar = load_dataset("cifar10", root=tmp_path, image_size=32, seed=0, val_fraction=0.25)
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (30, 10, 10)
    assert sorted(cifar.val[i][1] for i in range(10)) == list(range(10))  # stratified: one per class
    assert cifar.class_names[3] == "class3" and cifar.num_classes == 10
    image, label = cifar.test[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 3
    # The format's row layout: 1024 red, then 1024 green, then 1024 blue values, each image row-major.
    assert torch.equal(image, torch.from_numpy(test_rows[3].reshape(3, 32, 32)))


def test_cifar100_from_a_local_root_resized(tmp_path, monkeypatch):
    make_cifar_root(tmp_path, monkeypatch, torchvision.datasets.CIFAR100, per_class=2)
    cifar = load_dataset("cifar100", root=tmp_path, image_size=16, seed=0, val_fraction=0.5)
    assert (len(cifar.train), len(cifar.val), len(cifar.test), cifar.num_classes) == (100, 100, 100, 100)
    assert sorted(cifar.train[i][1] for i in range(100)) == list(range(100))
    image, _ = cifar.test[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)


def test_cifar_missing_root_says_what_to_extract_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("cifar10", root=tmp_path / "nowhere", image_size=32, seed=0)
    message = str(error.value)
    assert "extract cifar-10-python.tar.gz" in message
    assert f"{tmp_path / 'nowhere'}/cifar-10-batches-py/" in message and "never downloads" in message
    assert isinstance(error.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="cifar100 needs root=.*cifar-100-python.tar.gz"):
        load_dataset("cifar100", image_size=32, seed=0)


def test_cifar_files_with_wrong_checksums_are_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["batches.meta", "test_batch"] + [f"data_batch_{k}" for k in range(1, 6)]:
        (folder / name).write_bytes(b"not cifar")
    with pytest.raises(DatasetNotFoundError, match="failed torchvision's checksum check"):
        load_dataset("cifar10", root=tmp_path, image_size=32, seed=0)


# ---- imagefolder -----------------------------------------------------------------------------------------


def make_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 1)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    Image.fromarray(gray).save(root / "test" / "dog" / "gray.png")


def test_imagefolder_lists_files_and_decodes_on_access(tmp_path):
    make_imagefolder(tmp_path)
    folder = load_dataset(
        "imagefolder", root=tmp_path, image_size=16, seed=0, val_fraction=0.5, mean=MEAN, std=STD
    )
    assert folder.decoded_on_access and (folder.mean, folder.std) == (MEAN, STD)
    assert (len(folder.train), len(folder.val), len(folder.test)) == (4, 4, 3)
    assert folder.class_names == ("cat", "dog") and folder.num_classes == 2
    assert sorted(folder.val[i][1] for i in range(4)) == [0, 0, 1, 1]
    image, label = folder.train[0]  # training images stay whole: the replayed view crops them
    assert isinstance(image, Image.Image) and image.size == (24, 20) and label in (0, 1)
    for split in (folder.val, folder.test):  # evaluation images are centre crops at image_size
        for index in range(len(split)):
            image, label = split[index]
            assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label in (0, 1)
    gray, _ = folder.test[2]  # test/dog/gray.png sorts after test/dog/0.png
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])


def test_imagefolder_needs_the_students_normalization(tmp_path):
    make_imagefolder(tmp_path)
    with pytest.raises(ValueError, match="needs the student's mean and std"):
        load_dataset("imagefolder", root=tmp_path, image_size=16, seed=0)


def test_imagefolder_missing_layout_names_the_expected_folders(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"missing .*test; expected <root>/train/<class>/<image>"):
        load_dataset("imagefolder", root=tmp_path, image_size=16, seed=0, mean=MEAN, std=STD)
    with pytest.raises(DatasetNotFoundError, match="imagefolder needs root="):
        load_dataset("imagefolder", image_size=16, seed=0, mean=MEAN, std=STD)
