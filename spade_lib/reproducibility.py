"""The numerical environment that decides bit-for-bit results on a CPU.

PyTorch, oneDNN and MKL choose their kernels by the processor's instruction set, and PyTorch splits
reductions by the number of threads. So the same training run on two x86 machines (or with one
thread instead of two) gives different weights: measured on this project's machine, four settings
gave four ``smoke`` models. This module names the settings that decide it and runs work under them:

=======================  =========  ===============================================================
variable                 pinned to  what it decides
=======================  =========  ===============================================================
``ATEN_CPU_CAPABILITY``  ``avx2``   PyTorch's vectorised kernels (default: the best the CPU has)
``ONEDNN_MAX_CPU_ISA``   ``AVX2``   oneDNN's convolution kernels (``torch.backends.mkldnn``)
``MKL_CBWR``             ``AVX2``   MKL's code path (conditional numerical reproducibility)
``OMP_NUM_THREADS``      ``2``      how reductions and GEMMs are split (with ``MKL_NUM_THREADS``)
=======================  =========  ===============================================================

AVX2 is the common ground of every x86-64 processor made since about 2013-2015; a processor
without it cannot run the pinned settings (:func:`pinned_env` says so). The kernels read these
variables once, when first used, so they are applied by starting a new process
(:func:`run_pinned`); :func:`settings` records what the current process runs under, and
:func:`is_pinned` tells whether that matches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

THREADS = 2
PINNED: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}
# The capability name PyTorch reports for the pinned ATEN_CPU_CAPABILITY.
_PINNED_CAPABILITY = "AVX2"


def cpu_has_avx2() -> bool:
    """Whether this processor runs AVX2 code (read from ``/proc/cpuinfo`` on Linux; else the
    capability PyTorch chose by itself)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return " avx2" in fh.read()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def pinned_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with :data:`PINNED` applied over whatever it had.

    Raises
    ------
    RuntimeError
        If the processor has no AVX2, so the pinned kernels cannot run here.
    """
    if not cpu_has_avx2():
        raise RuntimeError("this processor has no AVX2: the pinned numerical settings "
                           f"{PINNED} cannot run here; results will differ from the book's")
    return {**(os.environ if base is None else base), **PINNED}


def settings() -> dict[str, Any]:
    """What decides this process's CPU numerics: the variables of :data:`PINNED` as set (``None``
    when unset), the capability PyTorch uses, its thread count and version. Stored with
    checkpoints and result stores, so a reader can tell under which settings they were made."""
    out: dict[str, Any] = {k: os.environ.get(k) for k in PINNED}
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["torch_threads"] = torch.get_num_threads()
    out["torch_version"] = str(torch.__version__)
    return out


def is_pinned(record: Mapping[str, Any] | None = None) -> bool:
    """Whether ``record`` (default: this process's :func:`settings`) was made under
    :data:`PINNED`: every variable at its pinned value and PyTorch on the pinned capability."""
    record = settings() if record is None else record
    return (all(record.get(k) == v for k, v in PINNED.items())
            and record.get("torch_cpu_capability") == _PINNED_CAPABILITY
            and record.get("torch_threads") == THREADS)


def run_pinned(module: str, args: Sequence[str], echo: bool = True) -> None:
    """Run ``python -m module *args`` in a new process under the pinned settings.

    The child's output (a progress bar, say) is copied to this process's ``stderr`` as it comes,
    so it shows in a notebook too.

    Raises
    ------
    RuntimeError
        If the child exits with a non-zero status (its last output lines are in the message).
    """
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, env=pinned_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    tail = b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):
        tail = (tail + chunk)[-4000:]
        if echo:
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           + tail.decode(errors="replace"))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m spade_lib.reproducibility COMMAND ...``: run a command under the pinned
    settings (``make book`` builds the book this way, so its evaluations are pinned too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        print("pinned:", " ".join(f"{k}={v}" for k, v in PINNED.items()))
        return
    os.execvpe(argv[0], argv, pinned_env())


if __name__ == "__main__":
    main()
