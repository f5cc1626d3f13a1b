"""Ray Data engine for ``python -m pipeline.batch ... --engine ray [--address ray://HOST:10001]``.

The same job as the local engine, spread over a Ray cluster: read -> ``map_batches`` on an actor
pool that loads the inspector once per actor -> ``map_batches`` on aligner actors (GPU actors
where the cluster has GPUs) that correct the flagged rows -> one output file. Each batch is
annotated by ``pipeline.jobs.process_rows`` itself, so the output schema, the scores, the error
texts and the summary (``Summary.add``, counted from the finished rows) are those of the local engine.

Design choices, and why:

* **Reading** reuses ``pipeline.tables.read_chunks`` inside a Ray read task (one task per file), so a
  JSONL line that is not JSON becomes an error row here too (``ray.data.read_json`` would fail
  the whole job). A plain path is read on the driver's node (for ``ray://`` that is the head
  node, so the file must be there or on a filesystem every node mounts); a URI (``s3://``,
  ``gs://``, ``file://`` ...) is fetched through ``pyarrow.fs`` by whichever node runs the task.
* **Rows travel as pickled dicts** with their input index (``_row``): log rows differ in their
  columns, and an Arrow table would add every other row's columns as nulls; the pickles are
  Ray's own transport format between our own processes, never a file anyone loads.
* **Order**: ``preserve_order`` is on, and the driver checks the row indices come back 0, 1, 2,
  ... before writing, so the output is in input order or the job fails loudly.
* **Output** is one file written on the driver by ``pipeline.io.RowWriter`` (identical bytes to
  the local engine's for the same scores); results stream back, so memory stays bounded. A
  Parquet output's schema is settled on the driver before the job (``jobs.output_schema``: a
  text input is read once more for it, a URI's through a local copy).
* **Aligner stage**: only flagged rows are corrected; the other rows pass through the actor
  untouched. Flagged rows are re-run through ``process_rows`` with the full pipeline (the
  inspector re-scores them, deterministic, so the score is the same up to float noise); this
  costs one extra inspector pass on the flagged share, small beside a generation.
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .env import offline_by_default
from .io import RowWriter
from .jobs import OUTPUT_COLUMNS, Summary, build_pipeline, output_columns, output_schema, process_rows
from .routing import PipelineConfig
from .tables import InputError, format_of, is_uri, read_chunks

ROW, PAYLOAD = "_row", "_payload"
READ_CPUS = 0.5            # a read task parses text: leave the rest of a core to the actors
CPU_ALIGNER_CPUS = 0.5     # an aligner actor without a GPU (tests, CPU-only clusters)


def require_ray_data():
    """``ray`` with Ray Data, or an ImportError that names the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks its dependencies)
    except ImportError as e:
        raise ImportError(f"the Ray engine needs Ray Data ({e}); install it with "
                          "pip install 'aligner-inspector-pipeline[ray]'") from e
    return ray


# ---------------------------------------------------------------------------------------- reading
def _local_copy(uri: str) -> tuple[Path, Path]:
    """Stream a remote file to this node's temp disk, so ``read_chunks`` reads it unchanged."""
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
        tmpdir = Path(tempfile.mkdtemp(prefix="ray-batch-"))
        local = tmpdir / Path(inner).name
        with fs.open_input_stream(inner) as src, local.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (OSError, ValueError) as e:
        raise InputError(f"{uri}: cannot read ({e})") from None
    return local, tmpdir


def read_blocks(path: str, chunk_rows: int):
    """Blocks of ``{_row, _payload}``: the input's rows, in order, as ``read_chunks`` yields them."""
    import pyarrow as pa

    tmpdir = None
    local = Path(path)
    if is_uri(path):
        local, tmpdir = _local_copy(path)
    try:
        n = 0
        for rows in read_chunks(local, chunk_rows):
            yield pa.table({ROW: pa.array(range(n, n + len(rows)), pa.int64()),
                            PAYLOAD: pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.binary())})
            n += len(rows)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _datasource_class():
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class LogDatasource(Datasource):
        """One read task per log file, reusing the local engine's readers."""

        def __init__(self, path: str, chunk_rows: int):
            super().__init__()
            self.path, self.chunk_rows = str(path), int(chunk_rows)

        @property
        def supports_distributed_reads(self) -> bool:
            return is_uri(self.path)  # a plain path exists on the driver's node only

        def estimate_inmemory_data_size(self):
            return None if is_uri(self.path) else os.path.getsize(self.path)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            path, chunk = self.path, self.chunk_rows
            meta = BlockMetadata(num_rows=None, size_bytes=self.estimate_inmemory_data_size(),
                                 exec_stats=None, input_files=(path,))
            return [ReadTask(lambda: read_blocks(path, chunk), meta)]

    return LogDatasource


# ---------------------------------------------------------------------------------------- stages
def _unpack(batch) -> tuple[list[int], list[dict]]:
    return batch[ROW].to_pylist(), [pickle.loads(b) for b in batch[PAYLOAD].to_pylist()]


def _pack(idx: list[int], rows: list[dict]):
    import pyarrow as pa

    return pa.table({ROW: pa.array(idx, pa.int64()),
                     PAYLOAD: pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.binary())})


def _runs(idx: list[int]):
    """(start, stop) slices of consecutive row indices, so error texts carry the global row number."""
    start = 0
    for k in range(1, len(idx) + 1):
        if k == len(idx) or idx[k] != idx[k - 1] + 1:
            yield start, k
            start = k


class InspectStage:
    """Ray actor (one inspector load per actor): annotates a batch exactly as the local engine."""

    def __init__(self, inspector_dir, threshold, fallback, max_new_tokens, query_col, answer_col, int8=False):
        offline_by_default()
        self.pipeline = build_pipeline(inspector_dir, threshold, None, fallback, max_new_tokens, int8=int8)
        self.cols = (query_col, answer_col)

    def __call__(self, batch):
        idx, rows = _unpack(batch)
        out: list[dict] = []
        for a, b in _runs(idx):
            out += process_rows(rows[a:b], self.pipeline, *self.cols, first_row=idx[a])
        return _pack(idx, out)


class AlignStage:
    """Ray actor holding the aligner (on a GPU where one is given) and an inspector for the
    re-inspection; corrects the flagged rows of a batch and passes the others through."""

    def __init__(self, inspector_dir, threshold, aligner, fallback, max_new_tokens, query_col, answer_col,
                 int8=False):
        offline_by_default()
        self.pipeline = build_pipeline(inspector_dir, threshold, aligner, fallback, max_new_tokens, int8=int8)
        self.cols = (query_col, answer_col)

    def __call__(self, batch):
        idx, rows = _unpack(batch)
        todo = [i for i, r in enumerate(rows) if r.get("flagged") and r.get("error") is None]
        if todo:
            fresh = [{**rows[i], **{c: None for c in OUTPUT_COLUMNS}} for i in todo]
            for i, r in zip(todo, process_rows(fresh, self.pipeline, *self.cols)):
                rows[i] = r
        return _pack(idx, rows)


# ---------------------------------------------------------------------------------------- driver
def _check_inspector(inspector_dir) -> None:
    """Fail on the driver, with the local engine's message, before any actor starts."""
    from inspector.model import DEFAULT_MODEL_DIR

    path = inspector_dir or os.environ.get("INSPECTOR_MODEL") or None
    folder = Path(path) if path else DEFAULT_MODEL_DIR
    if not (folder / "config.json").exists():
        hint = ("the bundled default inspector is missing: rebuild it with `make inspector`" if path is None
                else "expected a folder written by Inspector.save or inspector.train")
        raise FileNotFoundError(f"{folder / 'config.json'} not found: {hint}")


def _pool(n_max: int):
    """The actor pool: a fixed pool of one, else one that autoscales from 1 to ``n_max``."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=1) if n_max <= 1 else ActorPoolStrategy(min_size=1, max_size=n_max)


def _cause(exc: BaseException):
    """The user-facing error inside a Ray task failure (an unreadable CSV, a missing model):
    the deepest InputError / FileNotFoundError / ValueError in the chain, or None."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (InputError, FileNotFoundError, ValueError)):
            found = exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return found


@dataclass
class RayPools:
    """Actor pools; None means "from what the cluster has": inspector actors up to its CPUs less
    what the read and aligner stages need, one aligner actor per GPU (``aligner_gpus`` each,
    default 1), or one CPU aligner actor on a CPU-only cluster."""

    inspector_actors: int | None = None
    inspector_cpus: float = 1.0
    aligner_actors: int | None = None
    aligner_gpus: float | None = None

    def resolve(self, resources: dict, with_aligner: bool) -> dict:
        cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        gpu_each = float(self.aligner_gpus if self.aligner_gpus is not None else (1.0 if gpus >= 1 else 0.0))
        aligner_cpus = 1.0 if gpu_each else CPU_ALIGNER_CPUS
        reserve = READ_CPUS + (aligner_cpus if with_aligner else 0.0)
        return {"inspect": dict(compute=_pool(self.inspector_actors or
                                              max(1, math.floor((cpus - reserve) / self.inspector_cpus))),
                                num_cpus=self.inspector_cpus),
                "align": dict(compute=_pool(self.aligner_actors or
                                            (max(1, math.floor(gpus / gpu_each)) if gpu_each else 1)),
                              num_cpus=aligner_cpus, num_gpus=gpu_each)}


def run_ray_batch(input_path: str | Path, output_path: str | Path, *, inspector_dir: str | None = None,
                  threshold: float | None = None, aligner: str | None = None, fallback: str = "fail_open",
                  max_new_tokens: int | None = None, query_col: str = "query", answer_col: str = "answer",
                  chunk_rows: int = 256, address: str | None = None, pools: RayPools | None = None,
                  runtime_env: dict | None = None, int8: bool = False, show_progress: bool = True) -> Summary:
    """Moderate ``input_path`` into the local file ``output_path`` on Ray Data; returns the summary.

    ``address``: None starts (and stops) a local Ray; ``"auto"`` or ``"ray://HOST:10001"`` joins a
    cluster, shipping this project's packages with the job (``runtime_env`` overrides that). An
    already initialised Ray (tests, notebooks) is used as is, address ignored.
    """
    ray = require_ray_data()

    if is_uri(output_path):
        raise InputError(f"--out {output_path}: the Ray engine writes one local file; give a path")
    input_path, output_path = str(input_path), Path(output_path)
    format_of(input_path)
    out_fmt = format_of(output_path, "output")
    if not is_uri(input_path):
        if not Path(input_path).exists():
            raise InputError(f"{input_path}: no such file")
        if Path(input_path).resolve() == output_path.resolve():
            raise InputError("--out must differ from the input file")
    PipelineConfig(threshold=threshold, fallback=fallback)  # bad settings fail here, not in actors
    if address is None:
        _check_inspector(inspector_dir)

    started = False
    if not ray.is_initialized():
        if address is not None and runtime_env is None:
            import aligner as aligner_pkg
            import inspector as inspector_pkg
            import pipeline as pipeline_pkg

            runtime_env = {"py_modules": [inspector_pkg, aligner_pkg, pipeline_pkg],
                           "env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=show_progress)
        started = True
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = bool(show_progress)
    try:
        stage = dict(inspector_dir=inspector_dir, threshold=threshold, fallback=fallback,
                     max_new_tokens=max_new_tokens, query_col=query_col, answer_col=answer_col, int8=int8)
        res = (pools or RayPools()).resolve(ray.cluster_resources(), bool(aligner))
        ds = ray.data.read_datasource(_datasource_class()(input_path, chunk_rows), num_cpus=READ_CPUS,
                                      override_num_blocks=1)  # one task per file; its blocks are chunks
        ds = ds.map_batches(InspectStage, batch_size=chunk_rows, batch_format="pyarrow",
                            fn_constructor_kwargs=stage, **res["inspect"])
        if aligner:
            ds = ds.map_batches(AlignStage, batch_size=chunk_rows, batch_format="pyarrow",
                                fn_constructor_kwargs={**stage, "aligner": aligner}, **res["align"])
        empty = output_columns(input_path) if not is_uri(input_path) else None
        schema = _output_schema(input_path) if out_fmt == "parquet" else None
        return _write_in_order(ds, output_path, schema, show_progress, empty)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved  # the caller's session
        if started:
            ray.shutdown()


def _output_schema(input_path: str):
    """The Parquet output's schema, from the input (a text URI through a local copy)."""
    if not is_uri(input_path) or format_of(input_path) == "parquet":
        return output_schema(input_path)
    local, tmpdir = _local_copy(input_path)
    try:
        return output_schema(input_path, local)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _write_in_order(ds, output_path: Path, schema, show_progress: bool,
                    empty_columns: list[str] | None = None) -> Summary:
    """Stream the finished batches into one file, checking they come back in input order."""
    from tqdm.auto import tqdm

    summary = Summary()
    writer = RowWriter(output_path, schema=schema, empty_columns=empty_columns)
    t0 = time.perf_counter()
    try:
        with tqdm(unit="row", desc="moderating (ray)", disable=not show_progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                idx, rows = _unpack(batch)
                if idx != list(range(summary.rows, summary.rows + len(idx))):
                    raise RuntimeError(f"Ray returned rows out of order (expected row {summary.rows}, "
                                       f"got {idx[:3]}...); refusing to write a misordered output")
                writer.write(rows)
                summary.add(rows)
                bar.update(len(rows))
                bar.set_postfix(flagged=summary.flagged, errors=summary.errors)
        writer.close()
    except BaseException as e:
        writer.abort()
        cause = _cause(e) if isinstance(e, Exception) else None
        if cause is not None and type(cause) in (InputError, FileNotFoundError, ValueError):
            # the message alone: Ray appends retry advice and the remote traceback
            raise type(cause)(str(cause).split("\n")[0]) from None
        raise
    summary.seconds = time.perf_counter() - t0
    return summary
