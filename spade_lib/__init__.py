"""SPADE: sparsity-guided debugging of image classifiers.

The public face fits the PyTorch/Captum world::

    import spade_lib
    pruned = spade_lib.trace(model, image, sparsity=0.9)        # a pruned copy + per-layer report
    maps = spade_lib.attribute(model, images, target, method="Saliency", spade={"sparsity": 0.9})

Modules, one concern each (the README's Layout lists them all): ``config``, ``data``, ``scenes``,
``datasets``, ``trojan``, ``models``, ``train``, ``augment``, ``hessians``, ``pruning``,
``schedules``, ``trace``, ``attribution``, ``lrp``, ``metrics``, ``fidelity`` (one image's
gradient noise and mask agreement), ``gradient_noise`` and ``mask_agreement`` (chapters E and K
over many images), ``samples``, ``sources`` (where a trace's Hessians come from), ``variants``
(the networks a sample is explained with), ``results``, ``store``, ``tables``, ``search``,
``ablation`` (chapter D), ``fastobc`` (chapter I), ``widgets``;
shared helpers in ``checks``,
``files`` and ``reproducibility``. ``spade_lib.trace`` and ``spade_lib.augment`` are the
functions; import the modules of those names as ``from spade_lib.trace import ...`` /
``from spade_lib.augment import ...``.
"""

from spade_lib.attribution import METHODS, Attribution, attribute
from spade_lib.augment import augment
from spade_lib.trace import Trace, trace, trace_batch, trace_images

__all__ = ["METHODS", "Attribution", "Trace", "attribute", "augment", "trace", "trace_batch",
           "trace_images"]
__version__ = "0.1.0"
