"""The resumable results store: one Parquet file per finished sample, written atomically.

:class:`ResultStore` is a folder of ``sample-NNNNNNN.parquet`` files plus a ``meta.json`` that
records what produced them; :func:`open_store` turns the runner's ``store=`` argument into one.
The rows follow :data:`COLUMNS` with the fixed dtypes of :func:`typed_rows`, so a table read back
equals the one computed. A damaged file is set aside with a :class:`DamagedResultWarning` and its
sample computed again. :func:`key_hash` names a cache entry by the hash of what determines it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from spade_lib import metrics
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.samples import SAMPLE_COLUMNS

__all__ = ["COLUMNS", "DamagedResultWarning", "ResultStore", "key_hash", "open_store",
           "run_resumable", "typed_rows"]

COLUMNS = (
    *SAMPLE_COLUMNS, "method", "variant", *metrics.SCORE_COLUMNS, "keeps_prediction",
    "prediction", "donor", "trace_seconds", "attribution_seconds", "config_hash",
)
"""Columns of the results table (:func:`spade_lib.results.evaluate`), in order."""


def typed_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (columns :data:`COLUMNS`) with fixed dtypes, so a table read back from the store
    equals the one computed: int64 ids and labels, float64 scores and times, a bool
    ``keeps_prediction`` and object strings."""
    ints = ("sample", "rule", "clean_label", "target", "test_index", "prediction", "donor")
    floats = (*metrics.SCORE_COLUMNS, "trace_seconds", "attribution_seconds")
    out = frame.astype({**dict.fromkeys(ints, "int64"), **dict.fromkeys(floats, "float64"),
                        "keeps_prediction": "bool"})
    for col in ("rule_name", "method", "variant", "config_hash"):
        out[col] = out[col].astype(object)
    return out


def _as_read(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


def key_hash(blob: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``blob`` as JSON (sorted keys, ``str`` for other types):
    the name of a cache entry, from everything that determines it."""
    text = json.dumps(blob, sort_keys=True, default=str).encode()
    return hashlib.sha256(text).hexdigest()[:16]


class DamagedResultWarning(UserWarning):
    """A file of a result store could not be read; it is set aside and its sample recomputed."""


class ResultStore:
    """A folder of per-sample result files, each written atomically.

    ``sample-NNNNNNN.parquet`` holds every row of one finished sample; it is written to a temporary
    file in the same folder, flushed to disk and renamed into place (``os.replace``), so a file
    that exists is complete and a killed writer leaves at most an ignored ``.tmp`` file. Writers
    of different samples never touch the same file, so several processes may share a store.
    ``meta.json`` records what produced the rows. By default the rows are those of the runner
    (:data:`COLUMNS`, :func:`typed_rows`); another table passes its own ``typer`` (fixing the
    dtypes of a frame read back; ``None``: the frame as read) and ``columns`` (of an empty read).
    """

    def __init__(self, path: str | os.PathLike,
                 typer: Callable[[pd.DataFrame], pd.DataFrame] | None = typed_rows,
                 columns: Sequence[str] = COLUMNS) -> None:
        self.path = Path(path)
        self.typer = typer if typer is not None else _as_read
        self.columns = tuple(columns)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def file(self, sample: int) -> Path:
        """The file of one sample."""
        return self.path / f"sample-{int(sample):07d}.parquet"

    def done(self) -> set[int]:
        """Ids of the samples whose file exists and is a whole Parquet file.

        A damaged file (truncated, say, by a disk that filled up or a copy that broke off) is
        not counted: a :class:`DamagedResultWarning` names it, and it is moved aside to a hidden
        ``.damaged`` file so that the sample is computed again and no half row is ever read.
        """
        if not self.path.is_dir():
            return set()
        ids = set()
        for path in sorted(self.path.glob("sample-*.parquet")):
            try:
                pq.read_metadata(path)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                aside = path.with_name(f".{path.name}.damaged")
                os.replace(path, aside)
                warnings.warn(f"result file {str(path)!r} is damaged ({e}); moved to "
                              f"{aside.name!r}, the sample will be computed again",
                              DamagedResultWarning, stacklevel=2)
                continue
            ids.add(int(path.stem.split("-")[1]))
        return ids

    def write(self, sample: int, rows: pd.DataFrame) -> None:
        """Save the rows of one sample (atomically replacing any earlier file)."""
        atomic_write(self.file(sample), lambda fh: rows.to_parquet(fh, index=False))

    def read(self, samples: Sequence[int] | None = None) -> pd.DataFrame:
        """Rows of the given samples (all finished ones if ``None``), in that order."""
        ids = sorted(self.done()) if samples is None else [int(s) for s in samples]
        missing = [s for s in ids if not self.file(s).exists()]
        if missing:
            raise ValueError(f"store {str(self.path)!r} has no results for samples {missing}")
        if not ids:
            return self.typer(pd.DataFrame({c: [] for c in self.columns}))
        frames = [pd.read_parquet(self.file(s)) for s in ids]
        return self.typer(pd.concat(frames, ignore_index=True))

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Save ``meta.json`` (atomically)."""
        blob = json.dumps(meta, indent=1, sort_keys=True, default=str).encode()
        atomic_write(self.path / "meta.json", lambda fh: fh.write(blob))

    def read_meta(self) -> dict[str, Any] | None:
        """The saved ``meta.json``, or ``None`` if there is none or it is damaged (then a
        :class:`DamagedResultWarning` says so, and the runner writes it anew)."""
        path = self.path / "meta.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            warnings.warn(f"{str(path)!r} is damaged ({e}); it will be written again",
                          DamagedResultWarning, stacklevel=2)
            return None


def open_store(cfg: Config, store: bool | str | os.PathLike | ResultStore | None,
               key: str) -> ResultStore | None:
    """The store of run ``key`` named by the runner's ``store`` argument.

    ``True``: the folder ``cfg.cache_path("results", key)``; a directory: ``directory / key``; a
    :class:`ResultStore`: itself; ``None`` or ``False``: no store (``None`` is returned).

    Raises
    ------
    ValueError
        Any other ``store``.
    """
    if store is None or store is False:
        return None
    if store is True:
        return ResultStore(cfg.cache_path("results", key, "meta.json").parent)
    if isinstance(store, ResultStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return ResultStore(Path(store) / key)
    raise ValueError(f"store must be True, False, a directory or a ResultStore, got {store!r}")



def run_resumable(target: ResultStore | None, ids: Sequence[int],
                  compute: Callable[[int], pd.DataFrame], progress: bool = True,
                  desc: str = "samples") -> pd.DataFrame:
    """Every id's rows, in ``ids`` order: read from ``target`` where it has them, else computed.

    ``compute(position)`` returns the rows of ``ids[position]``; each is written to ``target``
    as soon as it is done (so a killed run loses only the id in flight), then the whole table is
    read back through the store's typer. With ``target=None`` nothing is stored and the computed
    frames are concatenated. A tqdm bar counts the ids, starting at those already stored.
    """
    from tqdm.auto import tqdm

    done = target.done() if target is not None else set()
    fresh: dict[int, pd.DataFrame] = {}
    todo = [i for i, s in enumerate(ids) if s not in done]
    with tqdm(total=len(ids), initial=len(ids) - len(todo), desc=desc,
              disable=not progress) as bar:
        for position in todo:
            rows = compute(position)
            if target is not None:
                target.write(ids[position], rows)
            else:
                fresh[ids[position]] = rows
            bar.update(1)
    if target is not None:
        return target.read(ids)
    return pd.concat([fresh[s] for s in ids], ignore_index=True)
