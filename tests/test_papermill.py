"""The README's papermill recipe: a preset file plus one override reach the chapter's config."""

from __future__ import annotations

import json
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
