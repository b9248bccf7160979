"""Same inputs, same results: the demo chain (world -> shard -> train a teacher -> score -> curate) run
twice through the CLI, in two folders, gives the same bytes.

Both runs serve their world on the same loopback port: each sample's json carries its url, port included.
"""

import hashlib
import json
import subprocess

import pytest
from conftest import BIN, ROOT, free_port

pytestmark = pytest.mark.slow

FAILING = '{"http_404": 2, "http_500": 0, "timeout": 0, "truncated": 1, "html": 0}'
TIMING = ("samples_per_s",)  # the only metrics.jsonl field that depends on the machine's load


def run_chain(root, port: int) -> None:
    sets = ["stages=[world, shard, train, score, curate]", f"world.port={port}", "world.n_train=600", "world.n_val=50",
            "world.n_test=2", f"world.failing_urls={FAILING}", "shard.processes=1", "shard.threads=8",
            "shard.samples_per_shard=300", "train.batch_size=100", "train.epochs=2", "train.lr=2e-3", "train.warmup_steps=2",
            "train.workers=2", "train.log_every=1", "score.processes=1", "score.batch_size=128", "curate.samples_per_shard=200"]
    result = subprocess.run([str(BIN / "softcurate"), "run", str(ROOT / "configs" / "demo.yaml"), "--root", str(root),
                             *(a for s in sets for a in ("--set", s))], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def digests(folder, pattern: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_two_runs_of_the_chain_give_the_same_bytes(tmp_path):
    port = free_port()
    first, second = tmp_path / "first", tmp_path / "second"
    run_chain(first, port)
    run_chain(second, port)

    tars = digests(first / "shards", "0*.tar")
    assert len(tars) == 3 and tars == digests(second / "shards", "0*.tar")
    assert digests(first / "shards", "0*.parquet") == digests(second / "shards", "0*.parquet")
    losses = metrics(first / "runs" / "teacher")
    assert [row["epoch"] for row in losses if "loss" in row] == [0] * 6 + [1] * 6
    assert losses == metrics(second / "runs" / "teacher")
    scores = digests(first / "scores", "0*.parquet")
    assert len(scores) == 3 and scores == digests(second / "scores", "0*.parquet")
    assert digests(first / "curated", "keep.parquet") == digests(second / "curated", "keep.parquet")
    assert digests(first / "curated", "0*.tar") == digests(second / "curated", "0*.tar")
