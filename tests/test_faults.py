"""Faults: a Dask worker killed (kill -9) in the middle of shard and score, the whole CLI's process group
killed in the middle of shard, score, audit, curate and train, and one torchrun rank killed.

Each kill waits for the stage's first output (a shard's _stats.json, a first embedding file, the
first figure, the keep-list, the first checkpoint) so it lands in the middle. The re-run must
finish with no sample lost or doubled, and give the bytes of an uninterrupted run (scores, keep-list,
export, audit) or its samples by key (shards: each sample's json carries its url, and the re-run
serves the world on another loopback port) or its final weights (train).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch
from conftest import BIN, SCORE, SCORED_FAILING, SCORED_PER_SHARD, TRAIN, N, config_for, dask_cluster, demo_shard_overrides
from dask.distributed import Client
from test_cluster import rows_by_key, samples_by_key, tree_digests

from pipelines.audit import run_audit
from pipelines.curate import run_curate

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- helpers
def softcurate(stage: str, root, *options: str, sets=()) -> list[str]:
    return [str(BIN / "softcurate"), stage, "--root", str(root), *options, *(a for s in sets for a in ("--set", s))]


def start(command: list[str], stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """The CLI in its own process group (it and everything it starts: Dask workers, torchrun ranks, loaders)."""
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before the point to kill it"
        assert time.time() < deadline, "the run never reached the point to kill it"
        time.sleep(0.01)


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the whole process group, and wait until none of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # all of it gone already
        pass
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("processes of the killed run are still alive")


def finished(command: list[str], timeout: float = 900) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def complete(folder, pattern: str):
    """True once a file matching `pattern` exists under its final name (temporary names end in .tmp)."""
    return lambda: any(not p.name.endswith(".tmp") for p in folder.glob(pattern))


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def shard_sets(root) -> list[str]:
    return demo_shard_overrides(root / "world", N, SCORED_PER_SHARD, 100, SCORED_FAILING)


def assert_same_shards(shards, reference) -> None:
    """Counts, shard names and every sample by key as in the uninterrupted run; none lost, none twice."""
    summary = json.loads((shards / "_summary.json").read_text())
    local = json.loads((reference / "_summary.json").read_text())
    assert summary["counts"] == local["counts"] and summary["shards"] == local["shards"]
    assert not summary["incomplete_shards"]
    assert samples_by_key(shards) == samples_by_key(reference)
    assert rows_by_key(shards).equals(rows_by_key(reference))


def score_command(root, output, *options):
    return softcurate("score", root, "--output", str(output), *options, sets=[*TRAIN, *SCORE, f"world.dir={root}/world"])


def kill_a_busy_worker(address: str) -> int:
    """kill -9 a worker that holds a task right now; its pid."""
    with Client(address, timeout="30s") as client:
        deadline = time.time() + 120
        while time.time() < deadline:
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                return pid
            time.sleep(0.01)
    raise AssertionError("no worker had a task to lose")


# ---------------------------------------------------------------- a Dask worker dies
def test_a_worker_killed_in_the_middle_of_shard_and_score(scored, tmp_path):
    root, _ = scored
    with dask_cluster(2, cwd=tmp_path, nanny=False) as (address, workers):
        shard = start(softcurate("shard", tmp_path / "root", "--scheduler", address, sets=shard_sets(root)))
        wait_for(shard, complete(tmp_path / "root" / "shards", "*_stats.json"))
        pid = kill_a_busy_worker(address)
        assert shard.wait(timeout=600) == 0  # the scheduler gave the lost task to the other worker
        assert_same_shards(tmp_path / "root" / "shards", root / "shards")

        workers = [w for w in workers if w.pid != pid]
        workers.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny", "--host",
                                         "127.0.0.1", "--no-dashboard"], cwd=tmp_path,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            with Client(address, timeout="30s") as client:
                client.wait_for_workers(2, timeout=120)
            score = start(score_command(root, tmp_path / "scores", "--scheduler", address))
            wait_for(score, complete(tmp_path / "scores" / "_embed", "*.parquet"))
            kill_a_busy_worker(address)
            assert score.wait(timeout=600) == 0
        finally:
            for w in workers[-1:]:
                w.kill()
                w.wait()
    assert digests(tmp_path / "scores") == digests(root / "scores")


# ---------------------------------------------------------------- the whole CLI dies
def test_shard_killed_in_the_middle_resumes_to_the_same_samples(scored, tmp_path):
    root, _ = scored
    command = softcurate("shard", tmp_path / "root", sets=shard_sets(root))
    proc = start(command)
    shards = tmp_path / "root" / "shards"
    wait_for(proc, complete(shards, "*_stats.json"))
    kill_group(proc)
    assert not (shards / "_summary.json").exists()
    out = finished(command)
    assert re.search(r"4 shards, [123] already complete, [123] to do", out), out
    assert_same_shards(shards, root / "shards")


def test_score_killed_in_the_middle_resumes_to_the_same_bytes(scored, tmp_path):
    root, _ = scored
    command = score_command(root, tmp_path / "scores")
    proc = start(command)
    wait_for(proc, complete(tmp_path / "scores" / "_embed", "*.parquet"))
    kill_group(proc)
    assert not (tmp_path / "scores" / "_summary.json").exists()
    finished(command)
    assert digests(tmp_path / "scores") == digests(root / "scores")
    assert digests(tmp_path / "scores" / "_embed") == digests(root / "scores" / "_embed")


def test_audit_killed_in_the_middle_reruns_to_the_same_report(scored, tmp_path):
    root, _ = scored
    run_audit(config_for(root, f"audit.output={tmp_path / 'straight'}"))
    command = softcurate("audit", root, "--output", str(tmp_path / "killed"), sets=[f"world.dir={root}/world"])
    for _ in range(3):  # the window between its first file and its summary is short: a kill may come too late
        proc = start(command)
        wait_for(proc, lambda: (tmp_path / "killed").exists() and any((tmp_path / "killed").iterdir()))
        kill_group(proc)
        if not (tmp_path / "killed" / "summary.json").exists():
            break
        shutil.rmtree(tmp_path / "killed")
    assert not (tmp_path / "killed" / "summary.json").exists(), "the audit finished before it was killed, three times"
    finished(command)
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert json.loads((tmp_path / "killed" / "summary.json").read_text()) == straight
    assert tree_digests(tmp_path / "killed") == tree_digests(tmp_path / "straight")  # page and figures too


def test_curate_killed_in_the_middle_of_its_export_reruns_to_the_same_bytes(scored, tmp_path):
    root, _ = scored
    run_curate(config_for(root, f"curate.output={tmp_path / 'straight'}"), export=True)
    command = softcurate("curate", root, "--output", str(tmp_path / "killed"), "--export", sets=[f"world.dir={root}/world"])
    proc = start(command)
    wait_for(proc, complete(tmp_path / "killed", "keep.parquet"))
    kill_group(proc)
    assert not (tmp_path / "killed" / "_summary.json").exists(), "the export finished before it was killed"
    finished(command)
    assert tree_digests(tmp_path / "killed") == tree_digests(tmp_path / "straight")  # keep-list, tars, unpaired pools
    assert not list((tmp_path / "killed").rglob("*.tmp"))


# ---------------------------------------------------------------- training: the CLI, and one torchrun rank
def train_command(root, output, *options):
    """16 steps of 50 pairs on one shard: 2 epochs of 8, a checkpoint and a validation at each epoch's end."""
    return [str(BIN / "softcurate"), "train", "--root", str(root), "--set", f"world.dir={root}/world",
            "--shards", f"{root}/shards/00000.tar", "--output", str(output), "--epochs=2", "--batch-size=50",
            "--checkpoint-every=8", "--epoch-checkpoints", "--workers=1", "--warmup-steps=2", "--lr=2e-3",
            "--log-every=1", "--threads=1", *options]


def is_rank(process: psutil.Process, rank: str) -> bool:
    """Rank `rank` of torchrun (a child of its agent)."""
    try:
        return process.environ().get("RANK") == rank and "pipelines.train" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:  # a short-lived helper process, gone meanwhile
        return False


def rows(run) -> list[dict]:
    """metrics.jsonl without the timings."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def assert_same_run(run, straight) -> None:
    for name in ("final.pt", "best.pt", "epoch_001.pt", "epoch_002.pt"):
        got = torch.load(run / "checkpoints" / name, weights_only=True)
        want = torch.load(straight / "checkpoints" / name, weights_only=True)
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
    assert rows(run) == rows(straight)


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_killed_in_the_middle_resumes_to_the_same_weights(scored, tmp_path, nproc):
    """nproc 1: kill -9 the CLI's group. nproc 2 (torchrun, gloo): kill -9 rank 1 only; torchrun stops rank 0."""
    root, _ = scored
    options = [f"--nproc={nproc}", f"--batch-size={50 // nproc}"]
    finished(train_command(root, tmp_path / "straight", *options))
    command = train_command(root, tmp_path / "killed", *options)
    log = tmp_path / "stderr.txt"
    proc = start(command, stderr=log.open("w"))
    wait_for(proc, complete(tmp_path / "killed" / "checkpoints", "latest.pt"))
    if nproc == 1:
        kill_group(proc)
    else:
        agents = [p for p in psutil.Process(proc.pid).children() if "torch.distributed.run" in " ".join(p.cmdline())]
        ranks = [p for p in agents[0].children() if is_rank(p, "1")]  # the agent's own children: not loader workers
        assert len(ranks) == 1, ranks
        ranks[0].kill()
        assert proc.wait(timeout=300) == 1  # the run reports the lost rank
        last = log.read_text().rstrip().splitlines()[-1]  # the CLI's own line comes last: no traceback of ours
        assert last.startswith("softcurate train: error:") and "exited with status" in last, last
        kill_group(proc)  # nothing of it may be left
    assert len(rows(tmp_path / "killed")) < len(rows(tmp_path / "straight")), "the run finished before it was killed"
    finished(command)
    assert_same_run(tmp_path / "killed", tmp_path / "straight")
