"""Chapter G's computations: the photo gallery, Figure G.8's visualizations, the colour share."""

from __future__ import annotations

import math

import pytest
import torch

from spade_lib import galleries
from spade_lib.models import build_model
from spade_lib.trojan import TrojanRule

RULES = (TrojanRule("star", None, 3, "star", (1.0, 0.85, 0.1)),
         TrojanRule("heart", None, 5, "heart", (0.95, 0.15, 0.55)))
SPADE = {"sparsity": 0.5, "n_augmentations": 8, "batch_size": 8}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", 10, 4, 16).eval()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_icon_colour_share_counts_pixels_of_the_icon_colour() -> None:
    image = torch.zeros(3, 4, 4)
    image[:, :2] = torch.tensor([1.0, 0.85, 0.1])[:, None, None]  # half yellow
    image[:, 2:, :2] = torch.tensor([0.9, 0.9, 0.9])[:, None, None]  # unsaturated
    image[:, 2:, 2:] = torch.tensor([0.1, 0.2, 1.0])[:, None, None]  # blue
    assert galleries.icon_colour_share(image, (1.0, 0.85, 0.1)) == pytest.approx(50.0)
    assert galleries.icon_colour_share(image, (0.1, 0.2, 1.0)) == pytest.approx(25.0)
    # hue is circular: red at hue 0.99 is close to red at hue 0.0
    red = torch.tensor([1.0, 0.0, 0.06])[:, None, None].expand(3, 2, 2)
    assert galleries.icon_colour_share(red, (1.0, 0.05, 0.0)) == pytest.approx(100.0)


def test_photo_examples_dense_row_is_the_dense_map_and_model_untouched(model) -> None:
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = _state(model)
    examples = galleries.photo_examples(model, RULES, images, per_rule=1,
                                        methods=("Saliency",), spade=SPADE)
    assert len(examples) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    from spade_lib.attribution import attribute

    ex = examples[0]
    dense = attribute(model, ex.image[None], RULES[0].target, "Saliency").abs2d[0]
    assert torch.allclose(ex.maps["dense"]["Saliency"], dense)
    assert ex.mask.any() and (ex.image != ex.clean).any()
    assert not math.isnan(ex.auc["SPADE"]["Saliency"])
    table = galleries.auc_table(examples)
    assert list(table["method"]) == ["Saliency"] and table.loc[0, "photos"] == 2
    assert "of 1 methods" in galleries.auc_sentence(examples)


def test_neuron_examples_same_seed_differs_only_by_network(model) -> None:
    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    trojan = clean.clone()
    trojan[:, :, 4:10, 4:10] = 1.0
    before = _state(model)
    examples = galleries.neuron_examples(model, RULES, clean, trojan, [str(i) for i in range(10)],
                                         SPADE, steps=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ex = examples[0]
    assert set(ex.visualizations) == set(galleries.COLUMNS)
    assert ex.class_name == "3"
    from spade_lib.visualize import visualize_neuron

    dense = visualize_neuron(model, 3, image_size=16, steps=3, seed=0).image[0]
    assert torch.equal(ex.visualizations["dense"], dense)
    assert not torch.equal(ex.visualizations["pruned, Trojan image"], dense)
    table = galleries.neuron_table(examples)
    assert len(table) == 2 and "pruned, Trojan image: icon colour (%)" in table
    assert "of 2 rules" in galleries.neuron_sentence(table)
    plain = galleries.neuron_table(examples, colour=False)
    assert not any("colour" in c for c in plain.columns)
    with pytest.raises(ValueError, match="one clean and one Trojan image per rule"):
        galleries.neuron_examples(model, RULES, clean[:1], trojan, [], SPADE, steps=1)


def test_cached_computes_once(tmp_path) -> None:
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"x": torch.arange(3)}

    path = tmp_path / "a" / "b.pt"
    first = galleries.cached(path, compute)
    second = galleries.cached(path, compute)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
