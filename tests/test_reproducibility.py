"""The pinned numerical settings reach a child process whatever the host's environment."""

from __future__ import annotations

import json
import subprocess
import sys

from spade_lib import reproducibility


def test_pinned_env_overrides_the_host() -> None:
    host = {"ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "1", "HOME": "/x"}
    env = reproducibility.pinned_env(host)
    assert env["HOME"] == "/x"
    assert {k: env[k] for k in reproducibility.PINNED} == reproducibility.PINNED


def test_is_pinned_reads_every_setting() -> None:
    record = {**reproducibility.PINNED, "torch_cpu_capability": "AVX2",
              "torch_threads": reproducibility.THREADS}
    assert reproducibility.is_pinned(record)
    assert not reproducibility.is_pinned({**record, "torch_cpu_capability": "AVX512"})
    assert not reproducibility.is_pinned({**record, "torch_threads": 1})
    assert not reproducibility.is_pinned({**record, "MKL_CBWR": None})


def test_the_command_runner_pins_a_child_whatever_the_host_says(monkeypatch) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = ("import json; from spade_lib import reproducibility as r; "
            "print(json.dumps(r.settings()))")
    out = subprocess.run([sys.executable, "-m", "spade_lib.reproducibility", sys.executable,
                          "-c", code], capture_output=True, text=True, check=True).stdout
    child = json.loads(out)
    assert reproducibility.is_pinned(child), child
