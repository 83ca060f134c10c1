"""The README's papermill recipe: a preset file plus one override reach the chapter's config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parent.parent


def test_preset_file_and_override_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "out.ipynb"
    params = {"preset": "cpu", "cache_dir": str(tmp_path / "cache")}  # the file wins over cpu
    papermill.execute_notebook(
        str(ROOT / "book" / "hyperparameters.ipynb"), str(out),
        parameters={**_yaml(ROOT / "params" / "smoke.yaml"), **params, "epochs": 1},
        cwd=str(ROOT / "book"), progress_bar=False, kernel_name="python3",
    )
    cells = json.loads(out.read_text())["cells"]
    text = "".join(
        "".join(o.get("text", "")) for c in cells if c["cell_type"] == "code"
        for o in c.get("outputs", [])
    )
    assert "preset: smoke" in text and "resnet20 width 8  |  1 epochs" in text, text[:500]
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in cells)
    assert list((tmp_path / "cache" / "models").glob("*.pt")), "the override trained its own model"


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_ablation_runs_from_the_command_line_with_the_notebook_on_stdout() -> None:
    """The project's headline command, ``papermill book/ablation.ipynb -p samples N``, at the
    smoke preset: without an output path papermill writes the executed notebook to stdout."""
    papermill_cli = Path(sys.executable).parent / "papermill"
    env = {**os.environ, "SPADE_PRESET": "smoke"}
    proc = subprocess.run([str(papermill_cli), "book/ablation.ipynb", "-p", "samples", "2",
                           "--cwd", "book", "--no-progress-bar"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cells = json.loads(proc.stdout)["cells"]
    injected = [c for c in cells if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "samples = 2" in "".join(injected[0]["source"])
    text = json.dumps([c.get("outputs", []) for c in cells if c["cell_type"] == "code"])
    assert "preset: smoke" in text and "2 samples (the paper: 100)" in text, text[:500]
    assert "Table D.11 here" in text and "Table D.14 here" in text
    assert "Traceback" not in text
