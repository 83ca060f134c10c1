"""SPADE: sparsity-guided debugging of image classifiers.

The public face fits the PyTorch/Captum world::

    import spade_lib
    pruned = spade_lib.trace(model, image, sparsity=0.9)        # a pruned copy + per-layer report
    maps = spade_lib.attribute(model, images, target, method="Saliency", spade={"sparsity": 0.9})

Modules, one concern each: ``config``, ``data``, ``trojan``, ``models``, ``train``, ``pruning``,
``trace`` (the module; ``spade_lib.trace`` is the function), ``attribution``, ``metrics``,
``results``, ``widgets``.
"""

from spade_lib.attribution import METHODS, Attribution, attribute
from spade_lib.trace import Trace, augment, trace, trace_batch

__all__ = ["METHODS", "Attribution", "Trace", "attribute", "augment", "trace", "trace_batch"]
__version__ = "0.1.0"
