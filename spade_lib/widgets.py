"""Client-side browsers for the book: they work in the static HTML, with no kernel.

A browser is a Dropdown ``jslink``-ed to a ``Stack`` of pre-rendered pages. The link runs in the
browser, so choosing an entry in the published book shows another page without Python; the images
travel inside the saved widget state. :func:`sample_view` gathers one evaluation sample's maps;
:func:`method_grid` (chapter A) and :func:`map_browser` (chapter B) lay them out.

Figures are drawn at their reading size: :data:`DPI` pixels per inch, labels of :data:`FONT_PT`
points, panels of :data:`CELL` inches, and no wider than the page's column (:data:`TEXT_WIDTH`, or
:data:`FULL_WIDTH` in a notebook cell tagged ``full-width``), so the page shows every figure at
its natural size and a map at 150 px or more. :func:`image_grid` wraps a row that would not fit
into blocks of columns. Every PNG written by :func:`png_bytes` from a figure of images records the
width of its smallest image panel under :data:`PANEL_PX_KEY`, which the book's browser test reads.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

DPI = 100
"""Pixels per inch of every figure written to PNG (and of the notebooks' inline backend): a figure
``w`` inches wide is ``w * DPI`` px, which the book shows at one CSS pixel per image pixel."""

TEXT_WIDTH = 6.8
"""Inches: the widest drawing that the book's text column shows unscaled. sphinx-book-theme 1.3
gives a notebook output 704 px in a 1300 px wide window (the window of the book's browser test);
the PNG adds Matplotlib's 0.1 inch of padding on each side of the drawing."""

FULL_WIDTH = 9.3
"""Inches: the same for a cell tagged ``full-width`` (the column plus the 36 % margin: 957 px)."""

CELL = 1.6
"""Inches of one :func:`image_grid` cell: a panel of about 150 px once the padding is taken."""

FONT_PT = 10
"""Points of the titles and captions of :func:`image_grid`: 14 px at :data:`DPI`, so still 9 pt
on a page that shows the figure at 90 % of its size."""

PANEL_PX_KEY = "spade:min-panel-px"
"""PNG text key under which :func:`png_bytes` records the smallest image panel's width in px."""


class Picture(Figure):
    """A Matplotlib figure that shows itself as a PNG in notebooks (no pyplot state needed)."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image as ``uint8`` HxWx3 (or HxW) from a ``[3,H,W]`` tensor in [0,1] or an array."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr


def panel_px(fig: Figure) -> float | None:
    """Width in px (at :data:`DPI`) of the narrowest axes of ``fig`` that shows an image, as drawn
    (after the layout and the images' aspect are applied); ``None`` when no axes shows one."""
    fig.draw_without_rendering()
    return _drawn_panel_px(fig)


def _drawn_panel_px(fig: Figure) -> float | None:
    """:func:`panel_px` of a figure as it was last drawn."""
    widths = [ax.get_window_extent().width / fig.dpi * DPI for ax in fig.axes if ax.images]
    return min(widths) if widths else None


def _png_text(png: bytes, key: str, value: str) -> bytes:
    """``png`` with a ``tEXt`` chunk ``key: value`` (Latin-1) inserted before its ``IEND``."""
    body = b"tEXt" + key.encode("latin-1") + b"\0" + value.encode("latin-1")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    end = png.rindex(b"IEND") - 4  # the chunk's length field
    return png[:end] + chunk + png[end:]


def png_bytes(image: torch.Tensor | np.ndarray | Figure, scale: int = 1) -> bytes:
    """PNG encoding of an image (nearest-neighbour upscaled by ``scale``) or a Matplotlib figure.

    A figure is written at :data:`DPI` with its white margin cropped; when it shows images, the
    PNG's text chunk :data:`PANEL_PX_KEY` holds :func:`panel_px` rounded down (measured on the
    drawing just saved).
    """
    from PIL import Image

    buf = io.BytesIO()
    if isinstance(image, Figure):
        image.savefig(buf, format="png", bbox_inches="tight", dpi=DPI)
        panel = _drawn_panel_px(image)
        png = buf.getvalue()
        return png if panel is None else _png_text(png, PANEL_PX_KEY, str(int(panel)))
    arr = to_uint8_image(image)
    pil = Image.fromarray(arr)
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    pil.save(buf, format="PNG")
    return buf.getvalue()


def img_tag(image: torch.Tensor | np.ndarray | Figure, scale: int = 1, title: str = "") -> str:
    """An inline ``<img>`` (base64 PNG) for HTML tables."""
    data = base64.b64encode(png_bytes(image, scale)).decode()
    return f'<img src="data:image/png;base64,{data}" title="{title}" alt="{title}"/>'


def _image(page: bytes | Figure) -> widgets.Image:
    """A page (PNG bytes, or a figure rendered to PNG here) as an Image widget."""
    return widgets.Image(value=page if isinstance(page, bytes) else png_bytes(page),
                         format="png", layout=widgets.Layout(max_width="100%"))


def browser(pages: Mapping[str, bytes | Figure], description: str = "show") -> widgets.VBox:
    """A Dropdown that picks one of ``pages`` (PNG bytes or figures), linked in the browser.

    Parameters
    ----------
    pages
        Label -> page. Figures are rendered to PNG once, here.
    description
        The Dropdown's label.
    """
    if not pages:
        raise ValueError("browser() needs at least one page")
    labels: Sequence[str] = list(pages)
    images = [_image(p) for p in pages.values()]
    dropdown = widgets.Dropdown(options=labels, index=0, description=description,
                                style={"description_width": "initial"})
    stack = widgets.Stack(images, selected_index=0)
    widgets.jslink((dropdown, "index"), (stack, "selected_index"))
    return widgets.VBox([dropdown, stack])


def grid_browser(pages: Mapping[str, Mapping[str, bytes | Figure]],
                 descriptions: tuple[str, str] = ("sample", "method")) -> widgets.VBox:
    """Two Dropdowns that pick a page by two keys (e.g. sample and method), linked in the browser.

    The first Dropdown selects a page of an outer ``Stack``; every outer page is an inner
    ``Stack`` whose index the second Dropdown drives (one ``jslink`` per inner Stack), so any
    combination shows without a kernel.

    Parameters
    ----------
    pages
        First key -> (second key -> page). Every first key must have the same second keys, in
        the same order.
    descriptions
        Labels of the two Dropdowns.
    """
    if not pages:
        raise ValueError("grid_browser() needs at least one page")
    outer = list(pages)
    inner = list(pages[outer[0]])
    if not inner:
        raise ValueError(f"grid_browser(): entry {outer[0]!r} has no pages")
    for key in outer:
        if list(pages[key]) != inner:
            raise ValueError(f"grid_browser(): entry {key!r} has pages {list(pages[key])}, "
                             f"expected {inner} like {outer[0]!r}")
    first = widgets.Dropdown(options=outer, index=0, description=descriptions[0],
                             style={"description_width": "initial"})
    second = widgets.Dropdown(options=inner, index=0, description=descriptions[1],
                              style={"description_width": "initial"})
    stacks = []
    for key in outer:
        stack = widgets.Stack([_image(p) for p in pages[key].values()], selected_index=0)
        widgets.jslink((second, "index"), (stack, "selected_index"))
        stacks.append(stack)
    outer_stack = widgets.Stack(stacks, selected_index=0)
    widgets.jslink((first, "index"), (outer_stack, "selected_index"))
    return widgets.VBox([widgets.HBox([first, second]), outer_stack])


def overlay_mask(image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray,
                 color: tuple[float, float, float] = (1.0, 0.0, 1.0)) -> np.ndarray:
    """The image with the mask's outline drawn in ``color`` (float HxWx3 in [0, 1])."""
    from scipy import ndimage

    img = to_uint8_image(image).astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    edge = m & ~ndimage.binary_erosion(m)
    img[edge] = color
    return img


def image_grid(
    rows: Sequence[Sequence[torch.Tensor | np.ndarray]],
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    cell: float = CELL,
    cmap: str = "gray",
    captions: Sequence[Sequence[str]] | None = None,
    *,
    max_cols: int | None = None,
    lead_cols: int = 0,
    width: float = TEXT_WIDTH,
    title: str | None = None,
) -> Picture:
    """A figure with one image per cell, wrapped to fit the page's width.

    Parameters
    ----------
    rows
        ``rows[r][c]``: a colour image (``[3, H, W]`` or ``[H, W, 3]``, values in [0, 1]) or a
        2-D map drawn with ``cmap``. Rows may be shorter than the longest (the rest stays blank).
    row_titles
        One title per row, written left of the row (in every block).
    col_titles
        One title per column, written above the column in the first row of its block.
    cell
        Side of one cell in inches (:data:`DPI` px each); smaller when ``max_cols`` columns of
        ``cell`` would be wider than ``width``.
    cmap
        Matplotlib colormap of the 2-D maps.
    captions
        ``captions[r][c]`` is written under cell ``(r, c)`` (missing or empty: none).
    max_cols
        Columns per row of the figure. A grid with more columns is wrapped into blocks, one under
        the other: block ``b`` shows every row's columns ``lead_cols + b * (max_cols - lead_cols)``
        onwards, after the ``lead_cols`` first columns, which every block repeats (chapter A's
        image beside each block of maps). ``None``: as many ``cell``-wide columns as fit in
        ``width`` (with the row titles).
    lead_cols
        Columns repeated at the start of every block, ``0 <= lead_cols < max_cols``.
    width
        Greatest width of the figure in inches: :data:`TEXT_WIDTH` for the book's text column,
        :data:`FULL_WIDTH` for a cell tagged ``full-width``.
    title
        A title over the whole figure.

    Returns
    -------
    Picture
        ``len(blocks) * len(rows)`` rows of axes with ``min(columns, max_cols)`` columns (blank
        cells have their axes off); titles and captions are :data:`FONT_PT` points.

    Raises
    ------
    ValueError
        No rows, or only empty ones; ``row_titles`` not one per row; ``cell``, ``width`` or
        ``max_cols`` not positive; ``lead_cols`` outside ``[0, max_cols)`` or not below the
        number of columns.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("image_grid() needs at least one row with an image")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"image_grid(): {len(row_titles)} row_titles for {n_rows} rows; "
                         "give one title per row")
    title_w = 1.2 if row_titles else 0.0  # inches left of the cells for the row titles
    if not cell > 0 or not width > title_w:
        raise ValueError(f"image_grid(): cell={cell!r} must be positive and width={width!r} "
                         f"above {title_w:g} (inches; row titles take {title_w:g})")
    if not _is_int(lead_cols):
        raise ValueError(f"image_grid(): lead_cols={lead_cols!r} must be an integer")
    if max_cols is None:
        max_cols = max(1, int((width - title_w) // cell), lead_cols + 1)
    if not _is_int(max_cols) or max_cols < 1:
        raise ValueError(f"image_grid(): max_cols={max_cols!r} must be a positive integer")
    if not 0 <= lead_cols < max_cols or (lead_cols and lead_cols >= n_cols):
        raise ValueError(f"image_grid(): lead_cols={lead_cols!r} must be an integer in "
                         f"[0, {min(max_cols, n_cols)}) for max_cols={max_cols} and {n_cols} "
                         "columns")
    blocks = _column_blocks(n_cols, int(max_cols), int(lead_cols))
    grid_cols = max(len(b) for b in blocks)
    cell = min(cell, (width - title_w) / grid_cols)
    # a line of FONT_PT text (72 pt per inch): captions under every row, titles over a block;
    # an empty gridspec row of ``gap`` inches between blocks sets them apart
    line, gap = 1.5 * FONT_PT / 72, 0.25
    block_h = n_rows * (cell + line * bool(captions)) + line * bool(col_titles)
    fig = Picture(figsize=(cell * grid_cols + title_w,
                           (block_h + gap) * len(blocks) - gap + (0.4 if title else 0)),
                  dpi=DPI, layout="compressed")
    fig.get_layout_engine().set(w_pad=2 / 72, h_pad=2 / 72, wspace=0.02, hspace=0.02)
    ratios = ([block_h / n_rows] * n_rows + [gap]) * len(blocks)
    grid = fig.add_gridspec(len(ratios) - 1, grid_cols, height_ratios=ratios[:-1])
    axes = [[fig.add_subplot(grid[b * (n_rows + 1) + r, k]) for k in range(grid_cols)]
            for b in range(len(blocks)) for r in range(n_rows)]
    for b, block in enumerate(blocks):
        for r, row in enumerate(rows):
            for k in range(grid_cols):
                ax = axes[b * n_rows + r][k]
                c = block[k] if k < len(block) else None
                if c is None or c >= len(row):
                    ax.axis("off")
                    continue
                _draw_cell(ax, row[c], cmap)
                if captions and r < len(captions) and c < len(captions[r]) and captions[r][c]:
                    ax.set_xlabel(captions[r][c], fontsize=FONT_PT)
                if r == 0 and col_titles and c < len(col_titles) and col_titles[c]:
                    ax.set_title(col_titles[c], fontsize=FONT_PT)
            if row_titles:
                axes[b * n_rows + r][0].set_ylabel(row_titles[r], fontsize=FONT_PT, rotation=0,
                                                   ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=FONT_PT + 1)
    return fig


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _column_blocks(n_cols: int, max_cols: int, lead_cols: int) -> list[list[int]]:
    """The column indices of every block of :func:`image_grid` (see its ``max_cols``)."""
    if n_cols <= max_cols:
        return [list(range(n_cols))]
    lead, rest, step = list(range(lead_cols)), range(lead_cols, n_cols), max_cols - lead_cols
    return [lead + list(rest[i:i + step]) for i in range(0, len(rest), step)]


def _draw_cell(ax: Any, image: torch.Tensor | np.ndarray, cmap: str) -> None:
    """One image (colour, or a 2-D map in ``cmap``) on a bare axes."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        ax.imshow(arr, cmap=cmap, interpolation="nearest")
    else:
        ax.imshow(np.clip(arr, 0, 1), interpolation="nearest")


# --------------------------------------------------------------------------------------------
# The maps of one evaluation sample (chapters A and B)
# --------------------------------------------------------------------------------------------

@dataclass
class SampleView:
    """One evaluation sample with its saliency maps (:func:`sample_view`).

    Attributes
    ----------
    info
        The sample's row of ``samples.table`` (``sample``, ``rule_name``, ``clean_label``,
        ``target`` ...).
    image
        The patched image, float ``[3, H, W]`` in [0, 1].
    mask
        The patch mask, bool ``[H, W]``.
    maps
        ``{variant: {method: Attribution}}`` from :func:`spade_lib.results.sample_maps`.
    decision
        The decision explained, for captions (:func:`spade_lib.samples.decision_label`);
        ``None``: Fashion-MNIST's class names of ``clean_label -> target``.
    """

    info: pd.Series
    image: torch.Tensor
    mask: torch.Tensor
    maps: dict[str, dict[str, Any]]
    decision: str | None = None

    def auc(self, variant: str, method: str) -> float:
        """The map's Trojan AUC of the absolute channel sum, in % (the row's ``auc_abs``)."""
        from spade_lib.metrics import trojan_scores

        return 100 * float(trojan_scores(self.maps[variant][method], self.mask[None])
                           .iloc[0]["auc_abs"])

    def title(self) -> str:
        """``"Rule: Coat -> Bag"``: the rule's short name and the decision it causes."""
        return f"{self.info['rule_name'].split(':')[0]}: {self.decision_text()}"

    def decision_text(self) -> str:
        """:attr:`decision`, or Fashion-MNIST's ``"Coat -> Bag"`` when it is not set."""
        return self.decision if self.decision is not None else class_change_of(self.info)


def sample_view(cfg: Any, model: torch.nn.Module, samples: Any, position: int,
                methods: Sequence[str], variants: Mapping[str, Any]) -> SampleView:
    """The maps of row ``position`` of ``samples.table`` under ``variants`` (name -> sparsity
    spec, see :func:`spade_lib.results.resolve_variants`), with the image and patch mask."""
    from spade_lib.results import sample_maps
    from spade_lib.samples import decision_label

    info = samples.table.iloc[position]
    sample = int(info["sample"])
    maps = sample_maps(cfg, model, samples, position, methods, variants)
    return SampleView(info, samples.poisoned.float_images([sample])[0],
                      samples.poisoned.masks[sample], maps, decision_label(samples, position))


def method_grid(view: SampleView, *, max_cols: int = 6, width: float = FULL_WIDTH) -> Picture:
    """Chapter A's figure of one sample: a row per variant, the patched image then every method's
    map (absolute channel sum) with its Trojan AUC underneath.

    The methods wrap into blocks of ``max_cols - 1`` columns, each block led by the image again
    (:func:`image_grid` with ``lead_cols=1``); the default ``width`` is that of a cell tagged
    ``full-width``, where ten methods make two blocks of maps of about 150 px.
    """
    methods = list(next(iter(view.maps.values())))
    rows, captions = [], []
    for name, per_method in view.maps.items():
        rows.append([overlay_mask(view.image, view.mask)]
                    + [a.abs2d[0] for a in per_method.values()])
        captions.append([name] + [f"AUC {view.auc(name, m):.1f}" for m in methods])
    info = view.info
    return image_grid(rows, col_titles=["image + patch", *methods], cmap="magma",
                      captions=captions, max_cols=max_cols, lead_cols=1, width=width,
                      title=f"rule {info['rule_name']}: {view.decision_text()} "
                            f"(sample {info['sample']})")


def class_change_of(info: pd.Series) -> str:
    """:func:`spade_lib.tables.class_change` of a sample row (``clean_label -> target``)."""
    from spade_lib.tables import class_change

    return class_change(info["clean_label"], info["target"])


def map_browser(cfg: Any, model: torch.nn.Module, samples: Any, methods: Sequence[str],
                n: int) -> widgets.VBox:
    """Chapter B's browser: for each of the first ``n`` samples and each method, the patched
    image with the patch outlined, the mask, and the dense and SPADE (``cfg.sparsity``) maps
    (absolute channel sum) with their Trojan AUCs; a :func:`grid_browser` by sample and method."""
    pages = {}
    for pos in range(min(n, len(samples))):
        view = sample_view(cfg, model, samples, pos, methods,
                           {"dense": None, "spade": cfg.sparsity})
        pages[f"{pos + 1}. {view.title()}"] = {m: image_grid(
            [[overlay_mask(view.image, view.mask), view.mask.float(),
              view.maps["dense"][m].abs2d[0], view.maps["spade"][m].abs2d[0]]],
            col_titles=["patched image", "patch mask", f"dense: AUC {view.auc('dense', m):.1f}",
                        f"SPADE: AUC {view.auc('spade', m):.1f}"], cell=1.7, cmap="magma",
            max_cols=4)
            for m in methods}
    return grid_browser(pages, ("sample", "method"))
