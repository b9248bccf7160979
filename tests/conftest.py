import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CC3M_TSV = ROOT.parent / "shared" / "data" / "cc3m" / "Validation_GCC-1.1.0-Validation.tsv"
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


def make_demo_shards(base: Path, n_train: int, per_shard: int, n_val: int = 2, failing: str = NO_FAILING_URLS) -> Path:
    """A small demo world sharded by the real shard stage (one Dask worker): what the train-side tests read."""
    from pipelines.config import load_config
    from pipelines.shard import run_shard

    run_shard(load_config(None, [
        f"root={base}", f"world.dir={base}/world", f"world.n_train={n_train}", f"world.n_val={n_val}",
        "world.n_test=2", f"world.failing_urls={failing}", "shard.processes=1", "shard.threads=8",
        f"shard.samples_per_shard={per_shard}", "shard.image_size=64"]))
    return base


# ---------------------------------------------------------------- a scored demo root (score, audit, curate tests)
N = 1200
EPOCHS = 6
TRAIN = ["train.name=teacher", "train.batch_size=100", f"train.epochs={EPOCHS}", "train.lr=2e-3", "train.warmup_steps=5",
         "train.workers=1", "train.epoch_checkpoints=true", "train.log_every=5"]
SCORE = ["score.processes=1", "score.batch_size=128"]


def config_for(root, *overrides):
    from pipelines.config import load_config

    return load_config(None, [f"root={root}", f"world.dir={root}/world", "world.n_val=100", *TRAIN, *SCORE, *overrides])


@pytest.fixture(scope="session")
def scored(tmp_path_factory):
    """A demo world sharded, a teacher trained on it (epoch checkpoints kept), and scored: (root, score summary)."""
    from pipelines.score import run_score
    from pipelines.train import run_train

    failing = '{"http_404": 1, "http_500": 0, "timeout": 0, "truncated": 0, "html": 0}'
    root = make_demo_shards(tmp_path_factory.mktemp("score"), N, per_shard=400, n_val=100, failing=failing)
    run_train(config_for(root))
    summary = run_score(config_for(root))
    return root, summary
