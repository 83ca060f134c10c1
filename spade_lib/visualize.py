"""Feature visualization: the image that maximizes one neuron, with lucent's recipe.

SPADE's second use (the paper's Figure G.8 and the human study of Appendix H) is to visualize a
neuron of the pruned copy: activation maximization, as in Olah et al. (2017, "Feature
Visualization", Distill) and its PyTorch port lucent, which SPADE used. :func:`visualize_neuron`
follows lucent's defaults:

- the image is parameterized in Fourier space (``rfft2`` coefficients scaled by ``1 / f``, so the
  optimizer sees a whitened image) with decorrelated colour (lucent's ImageNet colour
  correlation matrix) and a sigmoid into ``[0, 1]``;
- every step applies lucent's standard transforms: pad 12 (grey), jitter 8, random scale in
  ``[0.9, 1.1]``, random rotation in ``[-10, 10]`` degrees, jitter 4 (pixel amounts given at 224
  px and scaled to the image size);
- Adam with learning rate 0.05 for 512 steps maximizes the neuron: an output logit (a class
  neuron) or the mean activation of one channel of a named layer.

The model is never changed: it runs in eval mode on a copy of its mode flags, its parameters get
no gradient, and a layer's hook is installed and removed by a context manager. The result is
deterministic for a seed (on one device and kernel set).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_lib.checks import check_positive_int

__all__ = ["COLOR_CORRELATION", "Visualization", "fft_image", "to_rgb", "transform",
           "visualize_neuron"]

COLOR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02],
                                  [0.27, 0.00, -0.05],
                                  [0.27, -0.09, 0.03]])
"""Square root of ImageNet's colour correlation (lucent's ``color_correlation_svd_sqrt``)."""


@dataclass
class Visualization:
    """What :func:`visualize_neuron` returns.

    Attributes
    ----------
    image
        The visualization, ``[1, 3, H, W]`` in ``[0, 1]`` (``[B, 3, H, W]`` for ``B`` neurons),
        on the model's device.
    objective
        The neuron's activation at every step (on the transformed image), ``[steps]`` (``[steps,
        B]``).
    final
        The neuron's activation on ``image`` itself (no transform); a list for ``B`` neurons.
    """

    image: Tensor
    objective: Tensor
    final: float | list[float]


def fft_image(size: int, generator: torch.Generator, sd: float = 0.01,
              decay_power: float = 1.0, device: str | torch.device = "cpu", batch: int = 1
              ) -> tuple[Tensor, Callable[[], Tensor]]:
    """Lucent's Fourier parameterization of ``batch`` images of ``3 x size x size``.

    Returns the learnable coefficients ``[batch, 3, size, size // 2 + 1, 2]`` (drawn with ``sd``
    from ``generator``, one image after the other, so image ``i`` of a batch starts where a
    batch of one drawn after the first ``i`` would) and a function that maps them to the
    unconstrained images ``[batch, 3, size, size]`` (each frequency scaled by
    ``1 / max(f, 1 / size) ** decay_power``, as lucent).
    """
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freqs = torch.sqrt(fx**2 + fy**2)
    scale = (1.0 / torch.clamp(freqs, min=1.0 / size) ** decay_power).to(device)
    spectrum = torch.cat([torch.randn(1, 3, size, size // 2 + 1, 2, generator=generator) * sd
                          for _ in range(batch)]).to(device)
    spectrum.requires_grad_(True)

    def image() -> Tensor:
        coeffs = torch.view_as_complex(spectrum) * scale
        return torch.fft.irfftn(coeffs, s=(size, size), norm="ortho") / 4.0

    return spectrum, image


def to_rgb(raw: Tensor) -> Tensor:
    """Lucent's ``to_valid_rgb`` with decorrelation: the colour correlation (normalized by its
    largest column norm) applied to the channels, then a sigmoid into ``[0, 1]``."""
    corr = COLOR_CORRELATION.to(raw)
    corr = corr / corr.norm(dim=0).max()
    return torch.sigmoid(torch.einsum("bchw,dc->bdhw", raw, corr))


def transform(image: Tensor, generator: torch.Generator) -> Tensor:
    """Lucent's ``standard_transforms`` for ``image`` ``[B, 3, S, S]`` (the same draw for every
    image of the batch): pad 12 with grey,
    jitter 8, random scale, random rotation, jitter 4 (pixels at 224 px, scaled by ``S / 224``,
    at least 1)."""
    size = image.shape[-1]

    def px(n: int) -> int:
        return max(1, round(n * size / 224))

    def jitter(x: Tensor, d: int) -> Tensor:
        dx, dy = (int(v) for v in torch.randint(0, d, (2,), generator=generator))
        return x[..., dy:dy + x.shape[-2] - d, dx:dx + x.shape[-1] - d]

    x = F.pad(image, [px(12)] * 4, mode="constant", value=0.5)
    x = jitter(x, px(8))
    scales = [1 + (i - 5) / 50 for i in range(11)]
    s = scales[int(torch.randint(0, len(scales), (1,), generator=generator))]
    x = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    angles = [*range(-10, 11), *[0] * 5]
    a = math.radians(angles[int(torch.randint(0, len(angles), (1,), generator=generator))])
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                         dtype=x.dtype, device=x.device)[None].expand(x.shape[0], -1, -1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="border")
    return jitter(x, px(4))


@contextlib.contextmanager
def _activation(model: nn.Module, layer: str | None) -> Iterator[dict[str, Tensor]]:
    """Captures ``layer``'s output in ``store["out"]`` while active (``None``: nothing; the
    objective is then the model's output). The hook is removed on exit, whatever happens."""
    store: dict[str, Tensor] = {}
    if layer is None:
        yield store
        return
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} is not a module of the model; it has e.g. "
                         f"{[n for n in modules if n][:8]}")
    handle = modules[layer].register_forward_hook(
        lambda _m, _i, out: store.__setitem__("out", out))
    try:
        yield store
    finally:
        handle.remove()


def visualize_neuron(model: nn.Module, neuron: int | Sequence[int], *, image_size: int,
                     layer: str | None = None, steps: int = 512, lr: float = 0.05,
                     seed: int = 0, transforms: bool = True,
                     normalize: Callable[[Tensor], Tensor] | None = None,
                     progress: bool = False) -> Visualization:
    """The image that maximizes one neuron of ``model`` (lucent's recipe; see the module).

    Parameters
    ----------
    model
        An image classifier taking ``[B, 3, H, W]``; not changed (its train/eval flags are
        restored, its parameters' ``requires_grad`` too).
    neuron
        With ``layer=None``: the output logit (class neuron) to maximize; else the channel of
        ``layer``'s output whose mean activation is maximized. A sequence of neurons optimizes
        one image per neuron in one batch (the images do not interact: the model runs in eval
        mode; they share the random transforms of each step). Its first image is the one a
        single neuron would give, up to the rounding of batched kernels.
    image_size
        Side of the square image in pixels (the model's input size).
    layer
        A module name of ``model`` (``dict(model.named_modules())``), or ``None`` for the output.
    steps, lr
        Adam steps and learning rate (lucent: 512 and 0.05).
    seed
        Seeds the initial spectrum and the transforms (two independent streams of it).
    transforms
        Apply lucent's standard transforms at each step.
    normalize
        Applied to the ``[0, 1]`` image before the model (e.g. ImageNet mean/std).
    progress
        Show a progress bar.

    Returns
    -------
    Visualization
        For a sequence of ``B`` neurons: ``image`` ``[B, 3, H, W]``, ``objective``
        ``[steps, B]`` and ``final`` a list of ``B`` floats.

    Raises
    ------
    ValueError
        ``neuron`` outside the output (or the layer's channels), an unknown ``layer``, a bad
        ``steps``, ``image_size`` or ``lr``.
    """
    from tqdm.auto import tqdm

    steps = check_positive_int(steps, "steps")
    image_size = check_positive_int(image_size, "image_size")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    single = not isinstance(neuron, Sequence)
    neurons = [neuron] if single else list(neuron)
    if not neurons or any(isinstance(n, bool) or not isinstance(n, int) or n < 0
                          for n in neurons):
        raise ValueError(f"neuron must be an int >= 0 or a non-empty sequence of them, got "
                         f"{neuron!r}")
    device = next(model.parameters()).device
    # the start and the transforms draw from two streams of the seed, so that a batch of
    # neurons sees the same transforms as one neuron does
    start_seed, transform_seed = (int(s.generate_state(1)[0])
                                  for s in np.random.SeedSequence(int(seed)).spawn(2))
    spectrum, raw = fft_image(image_size, torch.Generator().manual_seed(start_seed),
                              device=device, batch=len(neurons))
    generator = torch.Generator().manual_seed(transform_seed)
    index = torch.arange(len(neurons), device=device)
    chosen = torch.tensor(neurons, device=device)
    optimizer = torch.optim.Adam([spectrum], lr=lr)
    prepare = normalize or (lambda x: x)
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    trace = torch.empty(steps, len(neurons))
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with _activation(model, layer) as store:

            def objective(image: Tensor) -> Tensor:
                out = model(prepare(image))
                act = out if layer is None else store["out"]
                if max(neurons) >= act.shape[1]:
                    where = "the output" if layer is None else f"layer {layer!r}"
                    raise ValueError(f"neuron {max(neurons)} is outside {where}, which has "
                                     f"{act.shape[1]} (0 to {act.shape[1] - 1})")
                return act[index, chosen].reshape(len(neurons), -1).mean(1)

            for step in tqdm(range(steps), desc="visualize", disable=not progress):
                optimizer.zero_grad(set_to_none=True)
                image = to_rgb(raw())
                value = objective(transform(image, generator) if transforms else image)
                (-value.sum()).backward()
                optimizer.step()
                trace[step] = value.detach()
            with torch.no_grad():
                final_image = to_rgb(raw())
                final = objective(final_image).tolist()
    finally:
        for m, flag in modes.items():
            m.train(flag)
        for p, flag in grads.items():
            p.requires_grad_(flag)
    if single:
        return Visualization(final_image.detach(), trace[:, 0], final[0])
    return Visualization(final_image.detach(), trace, final)
