"""``python -m spade_lib explain`` and :func:`spade_lib.cli.explain`: the maps and top classes of a
bundled photo on Lite0, dense and through SPADE, the user's network untouched, the figure, and a
one-line error with exit status 2 for every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from spade_lib import cli, models, schedules
from spade_lib.__main__ import main
from spade_lib.attribution import attribute, available
from spade_lib.trace import trace

pytestmark = pytest.mark.filterwarnings("ignore::spade_lib.pruning.SparsityTargetWarning")

VIEWS = 16  # augmented views in these tests (the default is cli.DEFAULT_N_AUGMENTATIONS)
ESPRESSO = 967


@pytest.fixture(scope="module")
def coffee(tmp_path_factory) -> Path:
    """skimage's coffee photo (400 x 600 RGB) as a PNG file."""
    path = tmp_path_factory.mktemp("photos") / "coffee.png"
    Image.fromarray(photos.coffee()).save(path)
    return path


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return models.lite0()


@pytest.fixture(scope="module")
def explained(coffee, lite0):
    """The coffee photo explained on the caller's Lite0, with the state it had before. The
    network is in training mode, where any forward pass of it would move its BatchNorm
    statistics; every test that uses it goes through copies in eval mode."""
    lite0.train()
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    result = cli.explain(coffee, model=lite0, n_augmentations=VIEWS, progress=False)
    return result, before


def test_explain_gives_maps_of_the_network_input_and_the_top_classes(explained, coffee) -> None:
    result, _ = explained
    x = models.lite0_preprocess(torch.from_numpy(photos.coffee()))[0]
    assert torch.equal(result.image, x)          # PNG is lossless: the same pixels
    assert result.dense_map.shape == result.spade_map.shape == (224, 224)
    assert torch.isfinite(result.dense_map).all() and torch.isfinite(result.spade_map).all()
    assert result.aggregation == "abs" and float(result.dense_map.min()) >= 0
    assert float(result.spade_map.abs().sum()) > 0
    names = models.imagenet_classes()
    for top in (result.dense_top, result.spade_top):
        assert len(top) == cli.TOP_K
        assert [name for i, name, _ in top] == [names[i] for i, _, _ in top]
        probs = [p for _, _, p in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert result.dense_top[0][:2] == (ESPRESSO, "espresso") and result.dense_top[0][2] > 0.9
    assert result.target == ESPRESSO and result.target_name == "espresso"
    assert result.source == "coffee.png" and result.n_augmentations == VIEWS
    assert result.sparsity == cli.DEFAULT_SPARSITY
    assert set(result.seconds) == {"model", "trace", "maps", "total"}
    assert 0 < result.seconds["trace"] < result.seconds["total"]


def test_the_maps_are_attribute_on_the_dense_network_and_on_its_trace(explained, lite0) -> None:
    result, _ = explained
    x = result.image[None]
    dense = attribute(lite0, x, ESPRESSO, method="Saliency").abs2d[0]
    # the same float32 computation: at most reduction-order differences between runs
    assert torch.allclose(result.dense_map, dense, rtol=1e-5, atol=1e-6 * float(dense.max()))
    tr = trace(lite0, x[0], sparsity=cli.DEFAULT_SPARSITY, n_augmentations=VIEWS, seed=0,
               batch_size=cli.BATCH_SIZE)
    spade = attribute(tr.model, x, ESPRESSO, method="Saliency").abs2d[0]
    assert torch.allclose(result.spade_map, spade, rtol=1e-5, atol=1e-6 * float(spade.max()))
    with torch.no_grad():
        probs = tr.model(x).softmax(1)[0]
    assert [i for i, _, _ in result.spade_top] == probs.topk(cli.TOP_K).indices.tolist()
    assert result.spade_top[0][2] == pytest.approx(float(probs.max()), rel=1e-5)
    assert not torch.allclose(result.spade_map, result.dense_map)  # the copy was pruned
    assert (tr.report["sparsity"] > 0).sum() == len(schedules.pruned_layers(
        lite0, cli.DEFAULT_SPARSITY))


def test_the_callers_network_is_untouched(explained, lite0) -> None:
    _, before = explained
    after = lite0.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in lite0.modules())
    assert all(p.grad is None for p in lite0.parameters())


def test_the_figure_shows_the_image_and_both_maps(explained) -> None:
    result, _ = explained
    fig = result.figure()
    width, height = fig.get_size_inches() * fig.dpi
    assert (round(width), round(height)) == (1050, 500)
    images = [ax.images[0].get_array() for ax in fig.axes]
    assert len(images) == 3 and images[0].shape == (224, 224, 3)
    assert np.array_equal(images[2], result.spade_map.numpy())
    text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert text.count("espresso") >= 2  # under the dense map and under the SPADE map


def test_the_command_prints_the_top_classes_and_writes_the_figure(coffee, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    status = main(["explain", str(coffee), "--n-augmentations", str(VIEWS), "--sparsity",
                   "linear:0:0.5"])
    out, err = capsys.readouterr()
    assert status == 0
    dense, spade = out.split("SPADE lite0")
    assert dense.startswith("dense lite0, top 5:") and "> espresso" in dense
    assert "sparsity linear:0:0.5, 16 views" in spade and "espresso" in spade
    assert "pruned 32 layers:" in out  # linear:0:... leaves the first of Lite0's 33 dense
    assert "explained: class 967 (espresso) with Saliency" in out and "seconds: trace" in out
    assert "SPADE trace" in err  # tqdm's progress goes to stderr
    png = tmp_path / "coffee-spade.png"
    assert f"wrote {png.name}" in out
    with Image.open(png) as img:
        assert img.size == (1050, 500) and img.format == "PNG"


def _one_line_error(capsys, argv: list[str]) -> str:
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "notes.png"
    path.write_text("not a picture\n")
    return path


@pytest.mark.parametrize(("extra", "expected"), [
    (["--method", "Nope"], "unknown attribution method 'Nope'; valid: Saliency"),
    (["--model", "resnet"], "unknown model 'resnet'; allowed: lite0"),
    (["--sparsity", "quadratic"], "unknown sparsity spec 'quadratic'"),
    (["--sparsity", "1.5"], "sparsity 1.5 is outside the allowed range [0, 1)"),
    (["--n-augmentations", "0"], "n_augmentations must be an integer >= 1"),
    (["--target", "1000"], "target 1000 out of range; the model has 1000 classes"),
    (["--method", "LRP"], "LRP needs a ReLU network"),
    (["--out", "no/such/folder/maps.png"], "folder 'no/such/folder' does not exist"),
])
def test_a_bad_option_is_one_line_and_status_2(coffee, capsys, extra, expected) -> None:
    assert expected in _one_line_error(capsys, ["explain", str(coffee), "--no-progress", *extra])


def test_a_bad_image_file_is_one_line_and_status_2(tmp_path, not_an_image, capsys) -> None:
    err = _one_line_error(capsys, ["explain", str(tmp_path / "missing.jpg")])
    assert "missing.jpg' does not exist" in err
    err = _one_line_error(capsys, ["explain", str(not_an_image)])
    assert "cannot read" in err and "notes.png" in err
    err = _one_line_error(capsys, ["explain", str(tmp_path)])
    assert "is not a file" in err
    err = _one_line_error(capsys, ["explain"])  # argparse's own errors are one line too
    assert "required: IMAGE" in err


def test_help_lists_the_commands_and_the_options(capsys) -> None:
    assert main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"--{o}" in out for o in ("model", "method", "sparsity", "n-augmentations",
                                           "target", "out", "seed"))


def test_python_dash_m_spade_lib_runs_as_a_program(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "spade_lib", "explain", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"python -m spade_lib explain: error: image file '{tmp_path / 'x.png'}' does not exist"]


def test_the_function_checks_its_arguments_before_any_work(lite0, coffee) -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'; allowed: lite0"):
        cli.explain(coffee, model="vgg")
    with pytest.raises(ValueError, match=f"valid: {', '.join(available())}"):
        cli.explain(coffee, model=lite0, method="saliency")
    with pytest.raises(ValueError, match="keys are layer names or block prefixes"):
        cli.explain(coffee, model=lite0, sparsity={"blocks.9": 0.5}, progress=False)
    with pytest.raises(ValueError, match="target must be None .* got -1"):
        cli.explain(coffee, model=lite0, target=-1)
    with pytest.raises(ValueError, match=r"shape \[5, 5, 4\]"):
        cli.explain(np.zeros((5, 5, 4), np.uint8), model=lite0)
    with pytest.raises(ValueError, match="values in \\[0, 1\\], got values in \\[-1, 2\\]"):
        cli.explain(np.linspace(-1, 2, 8 * 8 * 3).reshape(8, 8, 3), model=lite0)


def test_images_come_as_paths_or_arrays(coffee) -> None:
    array = photos.coffee()
    assert torch.equal(cli.load_image(coffee), torch.from_numpy(array))
    assert torch.equal(cli.load_image(str(coffee)), torch.from_numpy(array))
    gray = cli.load_image(np.full((4, 6), 0.25, np.float32))
    assert gray.shape == (3, 4, 6) and torch.equal(gray, torch.full((3, 4, 6), 0.25))
    chw = cli.load_image(torch.rand(1, 3, 5, 7))
    assert chw.shape == (3, 5, 7)
    with pytest.raises(ValueError, match="NaN or inf"):
        cli.load_image(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="must be a path, a numpy array or a torch.Tensor"):
        cli.load_image(42)


def test_sparsity_text_is_a_float_or_a_schedule_string() -> None:
    assert cli.parse_sparsity("0.5") == 0.5
    assert cli.parse_sparsity("linear") == "linear"
    assert cli.parse_sparsity("only:net.blocks.6:0.9") == "only:net.blocks.6:0.9"
    for bad, message in (("1", "outside the allowed range"), ("nan", "outside the allowed"),
                         ("linear:0:2", "bad sparsity spec"), ("cubic", "unknown sparsity")):
        with pytest.raises(ValueError, match=message):
            cli.parse_sparsity(bad)
