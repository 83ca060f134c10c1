"""Widgets: the client-side browsers are wired in the saved state, not by Python callbacks."""

from __future__ import annotations

import warnings

import ipywidgets as widgets
import numpy as np
import pytest
from ipywidgets.widgets.widget_link import Link

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
