"""Building the book in a test: the ``jupyter-book build`` call, the chapters and what each page
must show, shared by the smoke build (tests/test_book_browser.py) and the full-scale one
(tests/test_book_full_scale.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHAPTERS = ("saliency_methods", "additional_results", "hyperparameters", "ablation",
            "gradient_noise", "computational_cost", "examples", "human_evaluation", "fastobc",
            "fidelity", "mask_agreement", "full_evaluation")
"""The chapters A to L, by file name (book/_toc.yml)."""


def build(preset: str, out: Path, **env: str) -> Path:
    """``jupyter-book build book/`` at ``preset`` (``SPADE_PRESET``) into ``out``, with extra
    environment variables ``env``; returns the HTML folder. The build log is ``out/build.log``."""
    jb = Path(sys.executable).parent / "jupyter-book"
    proc = subprocess.run([str(jb), "build", str(ROOT / "book"), "--path-output", str(out)],
                          cwd=ROOT, env={**os.environ, "SPADE_PRESET": preset, **env},
                          capture_output=True, text=True, timeout=1800)
    (out / "build.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = out / "_build" / "html"
    assert (html / "index.html").exists()
    return html


def sphinx_warnings(html: Path) -> list[str]:
    """The build's Sphinx warnings and errors (a failed cell is one: "Executing notebook failed");
    Sphinx's format is ``file:line: WARNING: ...`` or ``WARNING: ...``; the kernels' own log lines
    (``[IPKernelApp] WARNING | ...``) are not about the book."""
    log = (html.parent.parent / "build.log").read_text()
    return [line for line in log.splitlines()
            if re.search(r"(^|: )(WARNING|ERROR|CRITICAL): ", line)]


def check_chapters(site: Path) -> dict[str, str]:
    """Every chapter was built without a traceback and shows its paper's tables and figures;
    returns the pages' HTML by chapter."""
    pages = {name: (site / f"{name}.html").read_text() for name in CHAPTERS}
    for name, page in pages.items():
        assert "Traceback" not in page, name
    assert "Table B.2" in pages["additional_results"]
    assert "Table A.1" in pages["saliency_methods"]
    assert "Figure E.5" in pages["gradient_noise"]
    assert "Table F.15" in pages["computational_cost"]
    assert "Table J.18" in pages["fidelity"]
    assert "Figure K.11" in pages["mask_agreement"]
    full = pages["full_evaluation"]
    assert "Table L.19" in full and "pass the filter" in full and "Verdict" in full
    fobc = pages["fastobc"]
    assert "Table I.16" in fobc and "Table I.17" in fobc and "mask group" in fobc
    ablation = pages["ablation"]
    assert all(f"Table D.1{k}" in ablation for k in (1, 2, 3, 4)) and "Figure D.4" in ablation
    examples = pages["examples"]
    assert "Figure G.8" in examples and "icon colour" in examples and "Trojan Lite0" in examples
    human = pages["human_evaluation"]
    assert "No human answers exist yet" in human and "automatic rater" in human
    return pages
