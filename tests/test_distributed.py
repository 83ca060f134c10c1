"""The evaluation on Dask: the same table as the serial runner, and nothing lost or recomputed
when the client or a worker is killed mid-way."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from spade_lib import results
from spade_lib.distributed import RunLog, TaskReport, connect, evaluate_distributed

sys.path.insert(0, str(Path(__file__).parent))
import dask_job  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet")
SECONDS = ["trace_seconds", "attribution_seconds"]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> pd.DataFrame:
    """The serial runner's table on one thread (what each single-threaded worker computes)."""
    cfg, model, samples = dask_job.job(str(tmp_path_factory.mktemp("serial")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return results.evaluate(cfg, model, samples, dask_job.METHODS, dask_job.VARIANTS,
                                store=False, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as local:
        yield local


def _same(table: pd.DataFrame, serial: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(table.drop(columns=SECONDS), serial.drop(columns=SECONDS))


def _files(store: Path) -> dict[str, tuple[int, int]]:
    """Finished result files with their inode and modification time (ns): a file written again
    (atomically, so under a new inode) changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in store.glob("*/sample-*.parquet")}


def test_equals_the_serial_runner_and_leaves_the_model_alone(tmp_path, serial, cluster) -> None:
    from distributed import Client

    cfg, model, samples = dask_job.job(str(tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = RunLog()
    with Client(cluster) as client:
        table = evaluate_distributed(cfg, model, samples, dask_job.METHODS, dask_job.VARIANTS,
                                     store=tmp_path / "store", progress=False, client=client,
                                     chunk=3, log=log)
    _same(table, serial)
    assert sorted(s for r in log.tasks for s in r.computed) == sorted(dask_job.IDS)
    assert len(log.tasks) == 7 and all(not r.found for r in log.tasks)  # 20 samples, chunks of 3
    assert log.workers == 2 and log.threads == 2 and not log.gpu and log.seconds > 0
    assert not list((tmp_path / "store").glob("*/.job-*"))  # the job file is removed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_scheduler_address_from_the_config(tmp_path, serial, cluster) -> None:
    cfg, model, samples = dask_job.job(str(tmp_path))
    cfg = cfg.replace(scheduler=cluster.scheduler_address)
    table = evaluate_distributed(cfg, model, samples, dask_job.METHODS, dask_job.VARIANTS,
                                 store=tmp_path / "store", progress=False)
    _same(table, serial)
    assert cfg.digest() == cfg.replace(scheduler=None, workers=3).digest()


def test_killed_client_resumes_without_recomputing(tmp_path, serial) -> None:
    store = tmp_path / "store"
    child = subprocess.Popen([sys.executable, str(HERE / "dask_job.py"), str(tmp_path),
                              str(store)], start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_files(store)) < 2:
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no result file within 240 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)  # the client (and the scheduler it holds) dies
        child.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):  # its workers may have gone already
            os.killpg(child.pid, signal.SIGKILL)
    time.sleep(0.5)  # a worker that outlived its client has finished writing by now
    kept = _files(store)
    assert 2 <= len(kept) < len(dask_job.IDS), kept
    cfg, model, samples = dask_job.job(str(tmp_path))
    log = RunLog()
    table = evaluate_distributed(cfg.replace(workers=2), model, samples, dask_job.METHODS,
                                 dask_job.VARIANTS, store=store, progress=False, log=log)
    computed = sorted(s for r in log.tasks for s in r.computed)
    assert len(computed) == len(dask_job.IDS) - len(kept)
    assert not {f"sample-{s:07d}.parquet" for s in computed} & set(kept)
    after = _files(store)
    assert {k: after[k] for k in kept} == kept  # the finished files were not written again
    assert len(after) == len(dask_job.IDS)
    _same(table, serial)
    assert not table.duplicated(["sample", "method", "variant"]).any()


def test_killed_worker_task_is_rerun_elsewhere(tmp_path, serial) -> None:
    from distributed import Client, LocalCluster

    cfg, model, samples = dask_job.job(str(tmp_path))
    store = tmp_path / "store"
    out: dict[str, object] = {}
    log = RunLog()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as local, Client(local) as client:
        def run() -> None:
            try:
                out["table"] = evaluate_distributed(
                    cfg, model, samples, dask_job.METHODS, dask_job.VARIANTS, store=store,
                    progress=False, client=client, log=log)
            except BaseException as e:  # handed to the test's thread below
                out["error"] = e

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 240
        while len(_files(store)) < 1 or not any(client.processing().values()):
            assert runner.is_alive(), out.get("error")
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim, assigned = next((w, t) for w, t in client.processing().items() if t)
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        before = _files(store)
        runner.join(300)
        assert not runner.is_alive()
    assert "error" not in out, out.get("error")
    after = _files(store)
    assert {k: after[k] for k in before} == before
    assert len(after) == len(dask_job.IDS)
    assert sorted(s for r in log.tasks for s in (*r.computed, *r.found)) == sorted(dask_job.IDS)
    # the samples the killed worker held and had not written were computed by another worker
    lost = {int(key.rsplit("-", 1)[1]) for key in assigned} - {
        int(name[7:14]) for name in before}
    assert lost, "the kill came after the worker had written every sample it held"
    by_worker = {s: r.worker for r in log.tasks for s in r.computed}
    assert all(by_worker[s] != victim for s in lost), (lost, by_worker, victim)
    _same(out["table"], serial)


def test_device_cuda_needs_a_gpu_worker(tmp_path, cluster) -> None:
    from distributed import Client

    cfg, model, samples = dask_job.job(str(tmp_path))
    with Client(cluster) as client, pytest.raises(ValueError, match="offers a GPU resource"):
        evaluate_distributed(cfg.replace(device="cuda"), model, samples, dask_job.METHODS,
                             dask_job.VARIANTS, store=tmp_path / "store", progress=False,
                             client=client)
    assert not list((tmp_path / "store").glob("*/sample-*"))


def test_bad_arguments_fail_before_any_work(tmp_path) -> None:
    cfg, model, samples = dask_job.job(str(tmp_path))
    with pytest.raises(ValueError, match="needs a result store"):
        evaluate_distributed(cfg, model, samples, store=False)
    with pytest.raises(ValueError, match="chunk must be a positive integer, got 0"):
        evaluate_distributed(cfg, model, samples, chunk=0)
    with pytest.raises(ValueError, match="n_workers must be at least 1"):
        with connect(cfg, n_workers=0):
            pass
    assert not (tmp_path / "results").exists()


def test_chapter_count_and_throughput(tmp_path) -> None:
    from spade_lib import distributed

    cfg = dask_job.job(str(tmp_path))[0]
    assert distributed.default_count(cfg) == distributed.DEFAULT_SAMPLES["smoke"]
    assert distributed.default_count(cfg, 7) == 7
    assert distributed.default_count(cfg, 7, whole_set=True) is None
    assert distributed.default_count(cfg.replace(name="mine")) is None
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        distributed.default_count(cfg, 0)
    log = RunLog(workers=2, submitted=10.0, finished=15.0, tasks=[
        TaskReport((1, 2), (), "w1", 4.0), TaskReport((3,), (4,), "w2", 2.0),
        TaskReport((), (5,), "w1", 0.1)])
    assert log.throughput() == {"samples": 3, "workers": 2, "seconds": 5.0,
                                "samples_per_second": 0.6, "task_seconds_per_sample": 2.0}
    assert math.isnan(RunLog().throughput()["samples_per_second"])
    assert distributed.worker_count(cfg.replace(workers=3)) == 3


def test_a_task_uses_the_cores_its_worker_does_not_share() -> None:
    from spade_lib.distributed import _torch_threads

    assert _torch_threads(1, None) == 1  # the local cluster: one single-threaded worker per core
    assert _torch_threads(8, None) == 1  # eight tasks at once on eight threads
    assert _torch_threads(8, 1) == 8  # one GPU task at a time: it has the worker's eight cores
    assert _torch_threads(8, 2) == 4
