"""Client-side browsers for the book: they work in the static HTML, with no kernel.

A browser is a Dropdown ``jslink``-ed to a ``Stack`` of pre-rendered pages. The link runs in the
browser, so choosing an entry in the published book shows another page without Python; the images
travel inside the saved widget state.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.figure import Figure


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


def png_bytes(image: torch.Tensor | np.ndarray | Figure, scale: int = 1) -> bytes:
    """PNG encoding of an image (nearest-neighbour upscaled by ``scale``) or a Matplotlib figure."""
    from PIL import Image

    buf = io.BytesIO()
    if isinstance(image, Figure):
        image.savefig(buf, format="png", bbox_inches="tight", dpi=100)
        return buf.getvalue()
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
    cell: float = 1.3,
    cmap: str = "gray",
    captions: Sequence[Sequence[str]] | None = None,
) -> Picture:
    """A figure with one image per cell (colour images, or 2-D maps drawn with ``cmap``);
    ``captions[r][c]`` is written under cell ``(r, c)``."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = Picture(figsize=(cell * n_cols + (1.2 if row_titles else 0), cell * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c >= len(row):
                continue
            arr = row[c]
            arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
            if arr.ndim == 3 and arr.shape[0] in (1, 3):
                arr = arr.transpose(1, 2, 0)
            if arr.ndim == 2:
                ax.imshow(arr, cmap=cmap, interpolation="nearest")
            else:
                ax.imshow(np.clip(arr, 0, 1), interpolation="nearest")
            if captions and r < len(captions) and c < len(captions[r]) and captions[r][c]:
                ax.set_xlabel(captions[r][c], fontsize=7)
            if r == 0 and col_titles and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=8)
        if row_titles:
            axes[r][0].set_ylabel(row_titles[r], fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig
