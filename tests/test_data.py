"""Tests for spade_lib.data: loading Fashion-MNIST from its idx files."""

from __future__ import annotations

import numpy as np
import pytest
from fashion import N_TEST, write_fashion

from spade_lib import data

# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_load_from_data_dir_and_env(tmp_path, monkeypatch):
    arrays = write_fashion(tmp_path / "a")
    images, labels = data.load_fashion_mnist("test", data_dir=tmp_path / "a")
    assert images.dtype == np.uint8 and images.shape == (N_TEST, 28, 28)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, arrays["test"][0])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    monkeypatch.setenv("SPADE_DATA_DIR", str(tmp_path / "a"))
    env_images, _ = data.load_fashion_mnist("train")
    np.testing.assert_array_equal(env_images, arrays["train"][0])
    env_images[:] = 0
    assert data.load_fashion_mnist("train")[0].any(), "callers get their own copy"


def test_load_uncompressed_torchvision_layout(tmp_path):
    arrays = write_fashion(tmp_path / "FashionMNIST" / "raw", compress=False)
    images, labels = data.load_fashion_mnist("train", data_dir=tmp_path)
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])


def test_missing_dataset_names_the_three_places(tmp_path, monkeypatch):
    monkeypatch.delenv("SPADE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(data, "_download_dir", lambda: tmp_path / "cache")

    def offline(root, split):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_download_fashion_mnist", offline)
    with pytest.raises(FileNotFoundError) as err, pytest.warns(UserWarning, match="mine"):
        data.load_fashion_mnist("train", data_dir=tmp_path / "mine")
    message = str(err.value)
    for needle in (str(tmp_path / "mine"), str(tmp_path / "system"), "torchvision",
                   str(tmp_path / "cache"), "network unreachable",
                   "apt-get install dataset-fashion-mnist", "SPADE_DATA_DIR",
                   "train-images-idx3-ubyte.gz", "internet"):
        assert needle in message, needle
    with pytest.raises(FileNotFoundError, match="download=False"):
        data.load_fashion_mnist("test", download=False)


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split 'val'.*train, test"):
        data.load_fashion_mnist("val")


@pytest.mark.skipif(
    not (data.FASHION_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist():
    images, labels = data.load_fashion_mnist("test", data_dir=data.FASHION_SYSTEM_DIR)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(data.FASHION_CLASSES) == 10


def test_class_label():
    assert data.class_label(0) == "0/T-shirt/top"
    assert data.class_label(np.int64(9)) == "9/Ankle boot"
    for bad in (-1, 10, True, 1.0):
        with pytest.raises(ValueError, match=r"label must be an integer in 0\.\.9"):
            data.class_label(bad)


def test_moved_names_resolve_from_data():
    from spade_lib import datasets, scenes

    assert data.load_scenes is scenes.load_scenes and data.SceneSet is scenes.SceneSet
    assert data.poisoned_test is scenes.poisoned_test and data.PoisonedSet is scenes.PoisonedSet
    assert data.image_folder is datasets.image_folder and data.celeba is datasets.celeba
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        data.nothing  # noqa: B018
