"""Widgets: the client-side browsers are wired in the saved state, not by Python callbacks."""

from __future__ import annotations

import warnings

import ipywidgets as widgets
import numpy as np
import pandas as pd
import pytest
import torch
from ipywidgets.widgets.widget_link import Link

import spade_lib.widgets as widgets_mod
from spade_lib import config, data, results
from spade_lib.data import FASHION_CLASSES
from spade_lib.widgets import browser, grid_browser, image_grid, png_bytes


def _png(value: int) -> bytes:
    return png_bytes(np.full((4, 4, 3), value, dtype=np.uint8))


def _links(owner: widgets.Widget) -> list[Link]:
    """The jslinks whose source is ``owner`` (from the registry of live widgets)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        live = list(widgets.Widget.widgets.values())
    return [w for w in live if isinstance(w, Link) and w.source[0] is owner]


def test_grid_browser_links_both_dropdowns_to_the_stacks() -> None:
    pages = {f"s{i}": {f"m{j}": _png(10 * i + j) for j in range(3)} for i in range(2)}
    box = grid_browser(pages, ("sample", "method"))
    first, second = box.children[0].children
    outer = box.children[1]
    assert list(first.options) == ["s0", "s1"] and list(second.options) == ["m0", "m1", "m2"]
    assert len(outer.children) == 2 and all(len(s.children) == 3 for s in outer.children)
    # page (i, j) holds the PNG made for it
    assert outer.children[1].children[2].value == _png(12)
    assert [link.target[0] for link in _links(first)] == [outer]
    assert {id(link.target[0]) for link in _links(second)} == {id(s) for s in outer.children}
    assert all(link.target[1] == "selected_index" for link in _links(second))


def test_grid_browser_refuses_ragged_pages() -> None:
    with pytest.raises(ValueError, match="at least one page"):
        grid_browser({})
    with pytest.raises(ValueError, match="'b' has pages \\['y'\\], expected \\['x'\\]"):
        grid_browser({"a": {"x": _png(1)}, "b": {"y": _png(2)}})


def test_browser_and_figures_render_to_png() -> None:
    fig = image_grid([[np.zeros((4, 4)), np.ones((4, 4, 3))]], col_titles=["a", "b"],
                     captions=[["left", "right"]])
    assert png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    box = browser({"one": _png(1), "two": fig})
    assert [c.__class__.__name__ for c in box.children] == ["Dropdown", "Stack"]
    assert box.children[1].children[1].value[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# The maps of one evaluation sample
# --------------------------------------------------------------------------------------------

@pytest.fixture
def run(tmp_path, model):
    """A smoke config, two samples and their rows (dense and SPADE, Saliency)."""
    cfg = config.load("smoke", cache_dir=str(tmp_path), n_augmentations=8,
                      sparsity="linear:0:0.8")
    _, test = data.load_scenes(cfg)
    samples = results.Samples.from_ids(data.poisoned_test(test, cfg.rules, seed=cfg.seed),
                                       test, [3, 500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = results.evaluate(cfg, model, samples, ["Saliency"],
                                 {"dense": None, "spade": cfg.sparsity}, store=False,
                                 progress=False)
    return cfg, samples, table


@pytest.mark.usefixtures("one_thread")
def test_sample_view_scores_are_the_rows_and_layouts_show_them(run, model) -> None:
    cfg, samples, table = run
    view = widgets_mod.sample_view(cfg, model, samples, 1, ["Saliency"],
                                   {"dense": None, "SPADE": cfg.sparsity})
    info = samples.table.iloc[1]
    rows = table[table["sample"] == 500].set_index("variant")
    for name, variant in (("dense", "dense"), ("SPADE", "spade")):
        expected = 100 * rows.loc[variant, "auc_abs"]
        got = view.auc(name, "Saliency")
        assert got == expected or (np.isnan(got) and np.isnan(expected))
    clean, target = int(info["clean_label"]), int(info["target"])
    change = f"{FASHION_CLASSES[clean]} -> {FASHION_CLASSES[target]}"
    assert view.title() == f"{info['rule_name'].split(':')[0]}: {change}"
    fig = widgets_mod.method_grid(view)
    axes = np.array(fig.axes).reshape(2, 2)
    assert [a.get_title() for a in axes[0]] == ["image + patch", "Saliency"]
    assert axes[1][1].get_xlabel() == f"AUC {view.auc('SPADE', 'Saliency'):.1f}"
    assert fig._suptitle.get_text() == f"rule {info['rule_name']}: {change} (sample 500)"
    box = widgets_mod.map_browser(cfg, model, samples, ["Saliency"], 5)
    first, second = box.children[0].children
    assert list(first.options) == ["1. " + widgets_mod.sample_view(
        cfg, model, samples, 0, ["Saliency"], {"dense": None}).title(), f"2. {view.title()}"]
    assert list(second.options) == ["Saliency"]


# --------------------------------------------------------------------------------------------
# Readable figures: wrapped grids, panel sizes, font sizes
# --------------------------------------------------------------------------------------------

METHODS = ["Saliency", "InputXGradient", "DeepLift", "LRP", "GuidedBackprop", "GuidedGradCam",
           "Lime", "Occlusion", "IntegratedGradients", "GradientShap"]


def _png_of(fig) -> tuple[int, dict[str, str]]:
    """The width in px of a figure's PNG and its text chunks."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png_bytes(fig)))
    return image.width, dict(image.text)


def _shown(ax) -> np.ndarray | None:
    images = ax.get_images()
    return np.asarray(images[0].get_array()) if images else None


def _smallest_text_pt(fig) -> float:
    texts = [fig._suptitle] if fig._suptitle else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
    return min(t.get_fontsize() for t in texts if t.get_text())


def test_image_grid_wraps_into_blocks_that_repeat_the_lead_column() -> None:
    rng = np.random.default_rng(0)
    rows = [[rng.random((8, 8)) + 10 * r + c for c in range(11)] for r in range(2)]
    captions = [[f"r{r}c{c}" for c in range(11)] for r in range(2)]
    fig = image_grid(rows, col_titles=[f"t{c}" for c in range(11)], captions=captions,
                     max_cols=6, lead_cols=1)
    axes = np.array(fig.axes).reshape(4, 6)  # 2 blocks x 2 rows, 6 columns each
    # block b, row r, slot k shows column 0 (k == 0) or 1 + 5 b + (k - 1)
    for b in range(2):
        for r in range(2):
            for k in range(6):
                c = 0 if k == 0 else 1 + 5 * b + (k - 1)
                np.testing.assert_array_equal(_shown(axes[2 * b + r][k]), rows[r][c])
                assert axes[2 * b + r][k].get_xlabel() == f"r{r}c{c}"
                assert axes[2 * b + r][k].get_title() == (f"t{c}" if r == 0 else "")
    # a ragged last block leaves its slots blank, with the axes off
    fig = image_grid([[np.zeros((4, 4))] * 6], max_cols=3, lead_cols=1)  # blocks 0 1 2, 0 3 4, 0 5
    axes = np.array(fig.axes).reshape(3, 3)
    assert [_shown(ax) is not None for ax in axes[2]] == [True, True, False]
    assert not axes[2][2].axison


def test_image_grid_fits_the_column_with_maps_of_about_150_px() -> None:
    """Default columns: as many ``CELL``-wide ones as fit ``TEXT_WIDTH``; the PNG is no wider
    than the book's column (704 px at a 1300 px window, 957 px full width) and every panel is
    about ``CELL * DPI`` px less the padding."""
    colour = np.ones((32, 32, 3)) * 0.5
    fig = image_grid([[colour] * 12], col_titles=["original"] + [""] * 11)
    spec = fig.axes[0].get_subplotspec().get_gridspec()
    assert len(fig.axes) == 12 and spec.ncols == 4  # 4 * 1.6 <= 6.8 < 5 * 1.6: 3 blocks of 4
    width, text = _png_of(fig)
    assert width <= 704
    assert int(text[widgets_mod.PANEL_PX_KEY]) >= 145
    assert _smallest_text_pt(fig) >= 9
    # chapter A's layout: 10 methods beside the image, dense and SPADE, in a full-width cell
    maps = [[colour] + [np.ones((32, 32))] * 10] * 2
    fig = image_grid(maps, col_titles=["image + patch", *METHODS], cmap="magma",
                     captions=[["dense"] + ["AUC 56.4"] * 10, ["SPADE"] + ["AUC nan"] * 10],
                     max_cols=6, lead_cols=1, width=widgets_mod.FULL_WIDTH, title="rule star")
    width, text = _png_of(fig)
    assert 704 < width <= 957
    assert int(text[widgets_mod.PANEL_PX_KEY]) >= 145
    assert _smallest_text_pt(fig) >= 9
    # max_cols that do not fit at ``cell`` shrink the cells to keep the figure within the width:
    # here to the old gallery's small panels (which the book's browser test refuses)
    fig = image_grid(maps, max_cols=11)
    width, text = _png_of(fig)
    assert width <= 704 and int(text[widgets_mod.PANEL_PX_KEY]) < 70


def test_png_records_the_smallest_image_panel_only_for_figures_of_images() -> None:
    fig = image_grid([[np.zeros((4, 4)), np.zeros((4, 4))]], cell=1.0)
    width, text = _png_of(fig)
    assert int(text[widgets_mod.PANEL_PX_KEY]) == int(widgets_mod.panel_px(fig))
    assert 80 <= int(text[widgets_mod.PANEL_PX_KEY]) <= 100  # 1 inch = 100 px, less padding
    plot = widgets_mod.Picture(figsize=(3, 2))
    plot.subplots().plot([0, 1], [1, 0])
    assert widgets_mod.PANEL_PX_KEY not in _png_of(plot)[1]
    assert widgets_mod.panel_px(plot) is None


def test_image_grid_refuses_bad_layouts() -> None:
    one = [[np.zeros((4, 4))] * 3]
    with pytest.raises(ValueError, match="at least one row"):
        image_grid([])
    with pytest.raises(ValueError, match="at least one row"):
        image_grid([[], []])
    with pytest.raises(ValueError, match="1 row_titles for 2 rows"):
        image_grid(one * 2, ["a"])
    with pytest.raises(ValueError, match="max_cols=0 must be a positive integer"):
        image_grid(one, max_cols=0)
    with pytest.raises(ValueError, match="lead_cols=2 must be an integer in \\[0, 2\\)"):
        image_grid(one, max_cols=2, lead_cols=2)
    with pytest.raises(ValueError, match="lead_cols=1.0 must be an integer"):
        image_grid(one, lead_cols=1.0)
    with pytest.raises(ValueError, match="max_cols='4' must be a positive integer"):
        image_grid(one, max_cols="4")
    with pytest.raises(ValueError, match="cell=0 must be positive and width=6.8 above 0"):
        image_grid(one, cell=0)
    with pytest.raises(ValueError, match="width=1.0 above 1.2 .* row titles take 1.2"):
        image_grid(one, ["a"], width=1.0)


def test_method_grid_puts_ten_methods_in_two_blocks_led_by_the_image() -> None:
    from spade_lib.attribution import Attribution

    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:6, 2:6] = True
    maps = {v: {m: Attribution(torch.rand(1, 3, 16, 16, generator=gen), m, torch.tensor([1]))
                for m in METHODS} for v in ("dense", "SPADE")}
    info = pd.Series({"sample": 7, "rule_name": "star: T-shirt/top -> Sandal", "clean_label": 0,
                      "target": 5})
    view = widgets_mod.SampleView(info, torch.rand(3, 16, 16, generator=gen), mask, maps)
    fig = widgets_mod.method_grid(view)
    axes = np.array(fig.axes).reshape(4, 6)
    assert [a.get_title() for a in axes[0]] == ["image + patch", *METHODS[:5]]
    assert [a.get_title() for a in axes[2]] == ["image + patch", *METHODS[5:]]
    assert [a.get_xlabel() for a in axes[:, 0]] == ["dense", "SPADE", "dense", "SPADE"]
    assert axes[3][5].get_xlabel() == f"AUC {view.auc('SPADE', METHODS[-1]):.1f}"
    np.testing.assert_array_equal(_shown(axes[3][5]), maps["SPADE"][METHODS[-1]].abs2d[0])
    width, text = _png_of(fig)
    assert width <= 957 and int(text[widgets_mod.PANEL_PX_KEY]) >= 145
