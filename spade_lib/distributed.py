"""The evaluation on Dask distributed: one task per sample, each task writing its own rows.

:func:`evaluate_distributed` computes what :func:`spade_lib.results.evaluate` computes (the same
rows, the same store, the same order) with the samples spread over the workers of a Dask cluster:
a :class:`distributed.LocalCluster` on this machine by default (one single-threaded worker process
per core), or any running cluster, named by its scheduler's address (``scheduler`` in the config)
or passed as a ``Client``. Each task explains one sample (or a small chunk) and writes its rows to
the run's :class:`~spade_lib.store.ResultStore` itself, atomically, before it reports back. So:

- a run whose client dies loses nothing that finished: the next call finds those files and
  submits only the samples without one;
- a worker that dies mid-task leaves no file (at most an ignored ``.tmp``); Dask reruns the task
  on another worker, and a task whose sample already has a file returns without recomputing it;
- a sample is one file whatever happens, so no row is lost or duplicated, and a file that exists
  is whole.

What the tasks need (config, model, samples, methods, variants) is written once per call to a
hidden file in the store (``.job-TOKEN.pkl``, removed when the call ends) and read once by each
worker process, so no task depends on data that a dying worker could take with it. The store must
therefore be on a filesystem every worker sees (on a cluster, a shared folder).

GPU workers are declared by Dask resources: start them with ``--resources GPU=1``, one worker
per GPU (give each its own ``CUDA_VISIBLE_DEVICES``, as dask-cuda does). With ``device: cuda``
every task asks for one ``GPU`` (an error names the scheduler if no worker offers one); with
``device: auto`` tasks ask for a GPU when the cluster's workers offer them; the client itself
never needs a GPU (the model is loaded and the samples are selected on its CPU).

A cluster on SLURM (dask-jobqueue, not a dependency of this package)::

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    cluster = SLURMCluster(cores=8, processes=1, memory="64GB", walltime="04:00:00",
                           job_extra_directives=["--gres=gpu:1"],
                           worker_extra_args=["--resources", "GPU=1"])
    cluster.scale(jobs=16)                 # 16 GPU workers
    with Client(cluster) as client:
        table = evaluate_distributed(cfg.replace(device="cuda"), client=client,
                                     store="/shared/spade-results")
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn

from spade_lib.checks import check_positive_int
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.results import Run, prepare_run, run_sample
from spade_lib.store import ResultStore
from spade_lib.variants import Variant

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["DEFAULT_SAMPLES", "METHODS", "RunLog", "TaskReport", "connect", "default_count",
           "evaluate_distributed", "worker_count"]

METHODS = ("LRP", "Saliency")
"""Chapter L's methods: LRP, as in the paper's Table L.19, and one gradient method."""

DEFAULT_SAMPLES = {"smoke": 4, "cpu": 48}
"""Chapter L's default sample count per preset (the whole set is ``whole_set=True``); a preset
not named here evaluates every sample that passes the filter."""


def default_count(cfg: Config, samples: int | None = None, whole_set: bool = False) -> int | None:
    """Chapter L's sample count: ``None`` (every sample that passes the filter) for
    ``whole_set``, else ``samples`` if given, else :data:`DEFAULT_SAMPLES` of the preset (a preset
    without an entry: ``None``)."""
    if whole_set:
        return None
    if samples is not None:
        return check_positive_int(samples, "samples")
    return DEFAULT_SAMPLES.get(cfg.defaults_name)


def worker_count(cfg: Config) -> int:
    """Workers of the local cluster: ``cfg.workers``, else one per core this process may use."""
    if cfg.workers is not None:
        return int(cfg.workers)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def connect(cfg: Config, n_workers: int | None = None,
            resources: Mapping[str, float] | None = None) -> Iterator[Client]:
    """A Dask client for ``cfg``'s evaluation, closed (with any cluster made here) on exit.

    Parameters
    ----------
    cfg
        ``cfg.scheduler``: the address of a running scheduler (e.g. ``"tcp://10.0.0.1:8786"``)
        to connect to; ``None``: start a :class:`distributed.LocalCluster` of ``n_workers``
        (default :func:`worker_count`) worker processes with one thread each.
    n_workers
        Overrides the local cluster's size.
    resources
        Resources of each local worker, e.g. ``{"GPU": 1}`` (default: ``{"GPU": 1}`` and one
        worker per visible GPU when ``cfg.device`` resolves to ``"cuda"`` on this machine).

    Raises
    ------
    ValueError
        ``n_workers`` below 1.
    """
    from distributed import Client, LocalCluster

    if cfg.scheduler is not None:
        with Client(cfg.scheduler) as client:
            yield client
        return
    n = worker_count(cfg) if n_workers is None else int(n_workers)
    if n < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers!r}")
    if resources is None and cfg.torch_device() == "cuda":
        import torch

        resources = {"GPU": 1}
        if n_workers is None:
            n = torch.cuda.device_count()
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      resources=dict(resources or {}), dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client


@dataclass(frozen=True)
class TaskReport:
    """What one task did: the samples whose rows it wrote and those it found already written
    (by an earlier run, or an earlier attempt of the same task), on which worker, in how long."""

    computed: tuple[int, ...]
    found: tuple[int, ...]
    worker: str
    seconds: float


@dataclass
class RunLog:
    """What one call of :func:`evaluate_distributed` did: where it ran, each task's
    :class:`TaskReport`, and the wall time from the first submission to the last result
    (cluster start-up excluded; both ``None`` when every sample was already stored)."""

    where: str = ""
    workers: int = 0
    threads: int = 0
    gpu: bool = False
    tasks: list[TaskReport] = field(default_factory=list)
    submitted: float | None = None
    finished: float | None = None

    @property
    def computed(self) -> int:
        """Samples computed by this call."""
        return sum(len(t.computed) for t in self.tasks)

    @property
    def seconds(self) -> float:
        """Wall seconds from the first submission to the last result (0 if nothing ran)."""
        if self.submitted is None or self.finished is None:
            return 0.0
        return self.finished - self.submitted

    def throughput(self) -> dict[str, float]:
        """Samples computed, workers, wall seconds, samples per second (NaN when nothing was
        computed) and the mean seconds of a computed sample inside its task."""
        busy = sum(t.seconds for t in self.tasks if t.computed)
        n = self.computed
        return {"samples": n, "workers": self.workers, "seconds": self.seconds,
                "samples_per_second": n / self.seconds if n and self.seconds > 0 else math.nan,
                "task_seconds_per_sample": busy / n if n else math.nan}


@dataclass(frozen=True)
class _Job:
    """Everything a task needs, written once per call to a file every worker reads."""

    cfg: Config
    model: nn.Module
    samples: Any
    methods: list[str]
    variants: list[Variant]
    method_options: Mapping[str, Mapping[str, Any]] | None
    key: str
    store: ResultStore
    gpu: bool


# Per worker process: the last job read, its model on the worker's device and the many-image
# networks shared between its samples (spade_lib.variants.variant_network), by job token.
_WORKER_STATE: dict[str, dict[str, Any]] = {}


def _worker_device(gpu: bool, name: Any) -> str:
    """The task's device: the CPU, or the worker's GPU (LocalCluster workers are named 0, 1, ...
    and take the GPU of their number; any other worker the current device, which
    ``CUDA_VISIBLE_DEVICES`` decides)."""
    if not gpu:
        return "cpu"
    import torch

    device = f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else "cuda"
    torch.cuda.set_device(torch.device(device))
    return device


def _torch_threads(nthreads: int, gpus: float | None) -> int:
    """CPU threads of one task: the worker's threads shared by the tasks it runs at once (one per
    thread, or one per GPU when its tasks each take a GPU), so a worker never oversubscribes."""
    at_once = min(nthreads, int(gpus)) if gpus else nthreads
    return max(1, nthreads // max(1, at_once))


def _job_state(path: str, token: str) -> dict[str, Any]:
    """The worker's copy of job ``token``: read from ``path`` on first use, model moved to the
    worker's device."""
    from distributed import get_worker

    state = _WORKER_STATE.get(token)
    if state is None:
        _WORKER_STATE.clear()  # one job at a time per worker: free the last one's networks
        with open(path, "rb") as fh:
            job: _Job = pickle.load(fh)
        device = _worker_device(job.gpu, get_worker().name)
        state = _WORKER_STATE[token] = {
            "job": job, "model": job.model.to(device), "shared": {},
            "position": {s: i for i, s in enumerate(job.samples.ids)}}
    return state


def _run_samples(path: str, token: str, sample_ids: Sequence[int]) -> TaskReport:
    """The task: explain the samples ``sample_ids`` of the job in ``path`` and write each one's
    rows to the store."""
    import torch
    from distributed import get_worker

    start = time.perf_counter()
    worker = get_worker()
    state = _job_state(path, token)
    job: _Job = state["job"]
    torch.set_num_threads(_torch_threads(int(worker.state.nthreads),
                                         worker.state.total_resources.get("GPU") if job.gpu
                                         else None))
    computed, found = [], []
    for sample in sample_ids:
        if job.store.file(sample).exists():
            found.append(sample)
            continue
        rows = run_sample(job.cfg, state["model"], job.samples, state["position"][sample],
                          job.methods, job.variants, job.method_options, config_hash=job.key,
                          shared=state["shared"])
        job.store.write(sample, rows)
        computed.append(sample)
    return TaskReport(tuple(computed), tuple(found), str(worker.address),
                      time.perf_counter() - start)


def evaluate_distributed(
    cfg: Config,
    model: nn.Module | None = None,
    samples: Any = None,
    methods: Sequence[str] | None = None,
    variants: Sequence[str | Variant] | Mapping[str, Any] = ("dense", "spade"),
    store: bool | str | os.PathLike | ResultStore = True,
    progress: bool = True,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    client: Client | None = None,
    chunk: int = 1,
    log: RunLog | None = None,
) -> pd.DataFrame:
    """:func:`spade_lib.results.evaluate` with the samples spread over a Dask cluster.

    The parameters up to ``method_options`` are those of :func:`~spade_lib.results.evaluate`
    and give the same table (columns :data:`spade_lib.store.COLUMNS`, the same order), read
    back from the same store, except that ``store`` cannot be ``False``: the tasks deliver
    their rows through it. Finished samples found there are not recomputed. The default model
    is loaded on this process's CPU (the workers move it to their device).

    Parameters
    ----------
    client
        A ``distributed.Client`` to run on; default: :func:`connect` (``cfg.scheduler``, else a
        local cluster), started only when a sample is missing and closed when done.
    chunk
        Samples per task (1: one task per sample; more saves scheduling on tiny samples).
    log
        A :class:`RunLog` that receives where the run went, each task's report and the wall
        time (for throughput).

    Returns
    -------
    pandas.DataFrame
        The results table, as :func:`~spade_lib.results.evaluate` returns it.

    Raises
    ------
    ValueError
        ``store`` is ``False`` or ``None``, ``chunk`` is not a positive integer, ``device`` is
        ``"cuda"`` but no worker offers a ``GPU`` resource, or any argument
        :func:`~spade_lib.results.evaluate` refuses.
    RuntimeError
        A task finished but its file is not in the store as this process sees it (the store is
        not on a filesystem shared with the workers).
    Exception
        The first error a task raised (the other tasks are cancelled; what finished stays stored).
    """
    if store is None or store is False:
        raise ValueError("evaluate_distributed needs a result store (store=True, a directory or "
                         f"a ResultStore): its tasks deliver their rows through it; got {store!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    if model is None:
        from spade_lib.train import trained_model

        model = trained_model(cfg, progress=progress).model
    run = prepare_run(cfg, model, samples, methods, variants, store, progress, method_options)
    assert run.store is not None
    if client is None and set(run.samples.ids) - run.store.done():
        with connect(cfg) as own:  # a cluster only when there is something to compute
            return _run_on(own, run, chunk, progress, log)
    return _run_on(client, run, chunk, progress, log)


def _wants_gpu(cfg: Config, workers: Mapping[str, Any], where: str) -> bool:
    offered = any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers.values())
    if cfg.device == "cuda" and not offered:
        raise ValueError(f"device is 'cuda' but no worker of {where} offers a GPU resource; "
                         "start GPU workers with '--resources GPU=1' (or set device: cpu)")
    return cfg.device == "cuda" or (cfg.device == "auto" and offered)


def _run_on(client: Client | None, run: Run, chunk: int, progress: bool,
            log: RunLog | None) -> pd.DataFrame:
    from distributed import as_completed
    from tqdm.auto import tqdm

    assert run.store is not None
    log = RunLog() if log is None else log
    ids = run.samples.ids
    done = run.store.done()
    todo = [s for s in ids if s not in done]
    if todo:
        assert client is not None
        workers = client.scheduler_info()["workers"]
        log.where = run.cfg.scheduler or "a local Dask cluster"
        log.workers = len(workers)
        log.threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        log.gpu = _wants_gpu(run.cfg, workers, log.where)
        token = uuid.uuid4().hex[:12]
        model = run.model
        if any(t.is_cuda for t in (*model.parameters(), *model.buffers())):
            model = copy.deepcopy(model).cpu()  # the workers may have no GPU (or another one)
        job = _Job(run.cfg, model, run.samples, run.methods, run.variants,
                   run.method_options, run.key, run.store, log.gpu)
        path = run.store.path / f".job-{token}.pkl"
        atomic_write(path, lambda fh: pickle.dump(job, fh, protocol=pickle.HIGHEST_PROTOCOL))
        resources = {"GPU": 1} if log.gpu else None
        try:
            log.submitted = time.monotonic()
            futures = [client.submit(_run_samples, str(path), token, todo[i:i + chunk],
                                     key=f"spade-{run.key}-{token}-{todo[i]:07d}",
                                     resources=resources, pure=False)
                       for i in range(0, len(todo), chunk)]
            with tqdm(total=len(ids), initial=len(ids) - len(todo), desc="samples",
                      disable=not progress) as bar:
                try:
                    for future in as_completed(futures):
                        report = future.result()  # re-raises a task's error here
                        log.tasks.append(report)
                        bar.update(len(report.computed) + len(report.found))
                finally:
                    client.cancel(futures)
            log.finished = time.monotonic()
        finally:
            with contextlib.suppress(FileNotFoundError):
                Path(path).unlink()
    missing = [s for s in ids if not run.store.file(s).exists()]
    if missing:
        raise RuntimeError(f"the workers finished samples {missing[:5]} (of {len(missing)}) but "
                           f"their files are not in {str(run.store.path)!r} as this process sees "
                           "it: the store must be on a filesystem every worker shares")
    return run.ordered(run.store.read(ids))


