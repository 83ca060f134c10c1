"""Widgets: the client-side browsers are wired in the saved state, not by Python callbacks."""

from __future__ import annotations

import warnings

import ipywidgets as widgets
import numpy as np
import pytest
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
