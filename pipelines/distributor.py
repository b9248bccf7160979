"""img2dataset's distributor contract, on Dask.

`dask_distributor` has the signature of img2dataset's own `multiprocessing_distributor` and
`pyspark_distributor`: it receives img2dataset's Downloader and Reader and runs one task per input
shard. Like the pyspark one, which uses the active Spark session, it uses the active Dask client
(a LocalCluster or a remote scheduler set up by the caller) and makes a LocalCluster only when
there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import dask
from dask.distributed import Client, LocalCluster, as_completed, default_client
from img2dataset.distributor import retrier
from tqdm import tqdm


def dask_distributor(processes_count, downloader, reader, subjob_size, max_shard_retry):
    """Run `downloader(shard)` for every shard of `reader` on Dask; retry failed shards."""
    with active_client(processes_count) as client:

        def run(shards):
            failed = []
            shards = list(shards)
            # subjob_size bounds how many shard tasks wait on the scheduler at once, as in pyspark's batches
            for start in range(0, len(shards), subjob_size):
                batch = shards[start:start + subjob_size]
                futures = client.map(downloader, batch, pure=False)
                shard_of = {future.key: shard for future, shard in zip(futures, batch)}
                for future in tqdm(as_completed(futures), total=len(futures), unit="shard", desc="shards",
                                   initial=start, dynamic_ncols=True):
                    try:
                        status, shard = future.result()
                    except Exception as err:  # e.g. KilledWorker: its workers died too often; retried, then reported
                        print(f"shard {shard_of[future.key][0]} task failed: {type(err).__name__}: {err}")
                        status, shard = False, shard_of[future.key]
                    if status is False:
                        failed.append(shard)
            return failed

        retrier(run, run(reader), max_shard_retry)


@contextlib.contextmanager
def active_client(processes_count: int):
    try:
        client = default_client()
    except ValueError:  # no client yet: own a LocalCluster for the duration
        client = None
    if client is not None:
        yield client
        return
    with dask_client(None, processes_count) as client:
        yield client


@contextlib.contextmanager
def dask_client(scheduler: str | None, processes: int, gpu: bool = False):
    """A client on an existing scheduler, or on a LocalCluster of `processes` single-threaded workers.

    With `gpu` and dask-cuda installed, a LocalCUDACluster: one worker per GPU, each pinned to its device.
    """
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # Dask's statistical profiler samples every worker thread each 10 ms: ~10% of a GIL-bound
    # decode + forward loop (measured on the score stage); the dashboard's profile page goes blank.
    dask.config.set({"distributed.worker.profile.enabled": False})
    # Workers are daemonic processes by default, and a daemonic process may not start children: the
    # score stage's decode processes (score.decode_workers) need them.
    dask.config.set({"distributed.worker.daemon": False})
    if scheduler:
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    if gpu:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            LocalCUDACluster = None
        if LocalCUDACluster is not None:
            with client_of(LocalCUDACluster(threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0")) as client:
                yield client
            return
    with client_of(LocalCluster(n_workers=processes, threads_per_worker=1, processes=True,
                                dashboard_address="127.0.0.1:0", host="127.0.0.1")) as client:
        yield client


# A worker process that imported torch, OpenCV and img2dataset needs a few seconds to exit (interpreter
# teardown; measured 4-6 s on a busy 2-core machine). The cluster closes its nannies with their default
# 5 s timeout, and a nanny kills a worker still alive after 0.8 of it, with a warning at every stage's
# end. So the workers are closed first, each given this long; one that is still alive then is killed.
WORKER_EXIT_SECONDS = 30


@contextlib.contextmanager
def client_of(cluster):
    """A client on `cluster`; on the way out the client closes, then the workers (given time to exit), then the cluster."""
    with cluster:
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.sync(close_workers, cluster)


async def close_workers(cluster) -> None:
    await asyncio.gather(*(nanny.close(timeout=WORKER_EXIT_SECONDS) for nanny in list(cluster.workers.values())))
