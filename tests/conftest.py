import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CC3M_TSV = ROOT / "tests" / "data" / "cc3m" / "Validation_GCC-1.1.0-Validation.tsv"  # tests/data/README.md
BIN = Path(sys.executable).parent
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture
def cc3m_tsv() -> Path:
    if not CC3M_TSV.exists():
        pytest.fail(f"the real CC3M validation list is missing: {CC3M_TSV}")
    return CC3M_TSV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_FAILING_URLS = '{"http_404": 0, "http_500": 0, "timeout": 0, "truncated": 0, "html": 0}'


def run_shard(config):
    """The shard stage as `softcurate shard` runs it: a demo config's world is served while it runs."""
    from pipelines.shard import run_shard as shard_stage
    from pipelines.world import serving

    with serving(config) as served:
        return shard_stage(served)


def make_demo_shards(base: Path, n_train: int, per_shard: int, n_val: int = 2, failing: str = NO_FAILING_URLS) -> Path:
    """A small demo world sharded by the real shard stage (one Dask worker): what the train-side tests read."""
    from pipelines.config import load_config

    run_shard(load_config(None, [f"root={base}", *demo_shard_overrides(base / "world", n_train, per_shard, n_val, failing)]))
    return base


def demo_shard_overrides(world_dir, n_train: int, per_shard: int, n_val: int = 2, failing: str = NO_FAILING_URLS) -> list[str]:
    """make_demo_shards' settings: shard the same world again (elsewhere, or through the CLI's --set) and get the same samples."""
    return [f"world.dir={world_dir}", f"world.n_train={n_train}", f"world.n_val={n_val}", "world.n_test=2",
            f"world.failing_urls={failing}", "shard.processes=1", "shard.threads=8", f"shard.samples_per_shard={per_shard}",
            "shard.image_size=64", "shard.allow_private_urls=true"]


# ---------------------------------------------------------------- a scored demo root (score, audit, curate tests)
N = 1200
EPOCHS = 6
TRAIN = ["train.name=teacher", "train.batch_size=100", f"train.epochs={EPOCHS}", "train.lr=2e-3", "train.warmup_steps=5",
         "train.workers=1", "train.epoch_checkpoints=true", "train.log_every=5"]
SCORE = ["score.processes=1", "score.batch_size=128"]


def config_for(root, *overrides):
    from pipelines.config import load_config

    return load_config(None, [f"root={root}", f"world.dir={root}/world", "world.n_val=100", *TRAIN, *SCORE, *overrides])


SCORED_PER_SHARD = 400
SCORED_FAILING = '{"http_404": 1, "http_500": 0, "timeout": 0, "truncated": 0, "html": 0}'


@pytest.fixture(scope="session")
def scored(tmp_path_factory):
    """A demo world sharded, a teacher trained on it (epoch checkpoints kept), and scored: (root, score summary)."""
    from pipelines.score import run_score
    from pipelines.train import run_train

    root = make_demo_shards(tmp_path_factory.mktemp("score"), N, per_shard=SCORED_PER_SHARD, n_val=100, failing=SCORED_FAILING)
    run_train(config_for(root))
    summary = run_score(config_for(root))
    return root, summary


# ---------------------------------------------------------------- an existing Dask cluster (cluster and fault tests)
@contextlib.contextmanager
def dask_cluster(n_workers: int, cwd, nanny: bool = True):
    """A real `dask scheduler` and `n_workers` single-threaded `dask worker` processes on loopback.

    Yields (address, worker processes); stops them all at the end, killing what does not stop.
    Workers start in `cwd`, not in the repository: the installed softcurate is what they import.
    """
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = open(Path(cwd) / "dask.log", "ab")
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              cwd=cwd, stdout=log, stderr=log)]
    try:
        workers = [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1", "--host",
                                     "127.0.0.1", "--no-dashboard", *([] if nanny else ["--no-nanny"])],
                                    cwd=cwd, stdout=log, stderr=log) for _ in range(n_workers)]
        procs += workers
        from dask.distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(n_workers, timeout=120)
        yield address, workers
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
