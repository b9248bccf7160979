"""The train stage on shards made by the shard stage: each objective trains and its loss falls,
checkpoints load in plain open_clip, torchrun runs two gloo processes, a killed run resumes exactly,
and open_clip's own trainer reads our shards."""

import json
import os
import signal
import subprocess
import sys
import time

import open_clip
import pytest
import torch
from conftest import BIN, make_demo_shards

from pipelines.config import load_config
from pipelines.train import run_train

N = 256
TRAIN = ["train.batch_size=32", "train.workers=1", "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=1",
         "train.threads=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    failing = '{"http_404": 1, "http_500": 0, "timeout": 0, "truncated": 0, "html": 0}'
    return make_demo_shards(tmp_path_factory.mktemp("train"), N, per_shard=64, n_val=64, failing=failing)


def config_for(root, *overrides):
    return load_config(None, [f"root={root}", f"world.dir={root}/world", *TRAIN, *overrides])


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def falls(curve, head=5, tail=5):
    return sum(curve[-tail:]) / tail < sum(curve[:head]) / head


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [
    ("clip", ["train.loss=clip"]),
    ("softclip", ["train.loss=softclip", "train.loss_args={alpha: 0.2, beta: 1.0, target: self}"]),
    ("oblique", ["train.loss=oblique", "train.oblique_k=4"]),
    ("oblique_floor", ["train.loss=oblique", "train.oblique_k=4",  # the loss's own scale range, not open_clip's
                       "train.loss_args={logit_scale_init: 0.5, logit_scale_min: 0.25}"]),
    ("oblique_k1_matched", ["train.loss=oblique", "train.oblique_k=1",  # K = 1 at K = 16's logit range
                            "train.loss_args={logit_scale_init: 16, logit_scale_min: 16, logit_scale_max: 100}"]),
    ("oblique_sphere", ["train.loss=oblique", "train.oblique_k=4",
                        "train.loss_args={topology: sphere, logit_scale_init: 4, logit_scale_min: 1, logit_scale_max: 100}"]),
    ("oblique_rn", ["train.loss=oblique", "train.oblique_k=16", "train.model=softcurate-rn-tiny"]),  # the efficacy students' tower
    # joint top-K is unbounded below; joint teacher pairs need trained weights (any checkpoint will do here)
    ("mmcl", ["train.loss=mmcl", "train.shards=ROOT/shards/{00000..00001}.tar", "train.pretrained=ROOT/start.pt",
              "train.unpaired.images=ROOT/shards/00002.tar", "train.unpaired.texts=ROOT/shards/00003.tar",
              "train.unpaired.batch_size=16", "train.unpaired.pairing=teacher"]),
    ("mmcl_aligned", ["train.loss=mmcl", "train.shards=ROOT/shards/{00000..00001}.tar", "train.pretrained=ROOT/start.pt",
                      "train.unpaired.images=ROOT/shards/00002.tar", "train.unpaired.batching=aligned",
                      "train.unpaired.batch_size=16", "train.unpaired.pairing=teacher"]),
])
def test_each_objective_trains_and_its_loss_falls(root, name, overrides):
    if any("start.pt" in o for o in overrides) and not (root / "start.pt").exists():
        import train.models

        torch.manual_seed(0)
        train.models.save_checkpoint(open_clip.create_model("softcurate-tiny"), root / "start.pt")
    overrides = [o.replace("ROOT", str(root)) for o in overrides]
    config = config_for(root, f"train.name={name}", "train.max_steps=30", *overrides)
    summary = run_train(config)
    assert summary["steps"] == 30
    curve = losses(root / "runs" / name)
    assert len(curve) == 30 and all(map(torch.isfinite, torch.tensor(curve)))
    assert falls(curve), curve
    assert (root / "runs" / name / "checkpoints" / "final.pt").exists()
    assert list((root / "runs" / name / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["best_val_recall"] >= 0
    rows = [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    scales = [r["logit_scale"] for r in rows if "logit_scale" in r]
    if name == "oblique_floor":  # the loop clamps the scale to the loss's [0.25, 6.25], so it starts at 0.5, not 1
        assert scales[0] == pytest.approx(0.5, abs=0.01) and all(0.25 - 1e-6 <= v <= 6.25 for v in scales), scales
    if name == "oblique_k1_matched":  # open_clip's cap of 100 and the control's floor of 16 both hold
        assert scales[0] == pytest.approx(16, abs=0.2) and all(16 - 1e-4 <= v <= 100 + 1e-4 for v in scales), scales
    if name == "oblique_sphere":  # the run's model normalises as its loss did, and its checkpoint says so
        from train.oblique import load_oblique

        assert torch.load(summary["final_checkpoint"], weights_only=True)["topology"] == "sphere"
        model, *_ = load_oblique("softcurate-tiny", summary["final_checkpoint"], 4)
        with torch.no_grad():
            features = model.eval().encode_image(torch.rand(2, 3, 64, 64), normalize=True)
        assert features.shape == (2, 64)
    if name == "oblique_rn":  # the evaluate stage loads and encodes the ResNet student as it trained: 16 tokens of 4
        from pipelines.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(config, summary["final_checkpoint"])
        assert result["oblique_k"] == 16 and result["topology"] == "oblique", result
        assert 0 <= result["retrieval"]["dot"]["t2i_R@1"] <= 1
    if name.startswith("mmcl"):
        assert all("unpaired_loss" in r for r in rows if "loss" in r)


@pytest.mark.slow
def test_checkpoint_loads_in_plain_open_clip(root):
    config = config_for(root, "train.name=ckpt", "train.max_steps=3")
    summary = run_train(config)
    import train.models  # noqa: F401  registers softcurate-tiny with open_clip
    model, _, _ = open_clip.create_model_and_transforms("softcurate-tiny", pretrained=summary["final_checkpoint"])
    state = torch.load(summary["final_checkpoint"], weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name])


@pytest.mark.slow
def test_killed_run_resumes_on_the_same_loss_curve(root):
    common = [f"--root={root}", "--set", f"world.dir={root}/world", "--max-steps=16", "--checkpoint-every=4",
              "--batch-size=32", "--workers=1", "--warmup-steps=2", "--lr=2e-3", "--log-every=1", "--threads=1"]
    straight = subprocess.run([str(BIN / "softcurate"), "train", "--name=straight", *common],
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    command = [str(BIN / "softcurate"), "train", "--name=killed", *common]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = root / "runs" / "killed" / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data workers, mid-run
    proc.wait()
    assert len(losses(root / "runs" / "killed")) < 16, "the run finished before it could be killed"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(losses(root / "runs" / "killed")),
                               torch.tensor(losses(root / "runs" / "straight")), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_gloo_processes(root):
    config = config_for(root, "train.name=ddp", "train.nproc=2", "train.max_steps=12", "train.batch_size=16")
    summary = run_train(config)
    assert summary["steps"] == 12
    curve = losses(root / "runs" / "ddp")
    assert len(curve) == 12 and falls(curve, 3, 3)


@pytest.mark.slow
def test_open_clip_train_reads_our_shards(root, tmp_path):
    """open_clip's own trainer on the shard stage's output, the model given as a local-dir config."""
    import train.models

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    model_cfg = json.loads((train.models.CONFIG_DIR / "softcurate-tiny.json").read_text())
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    result = subprocess.run(
        [sys.executable, "-m", "open_clip_train.main", "--train-data", f"{root}/shards/{{00000..00003}}.tar",
         "--train-num-samples", "192", "--dataset-type", "webdataset", "--model", f"local-dir:{model_dir}",
         "--batch-size", "32", "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--warmup", "1",
         "--logs", str(tmp_path / "logs"), "--name", "oc", "--save-frequency", "1", "--report-to", "",
         "--device", "cpu", "--precision", "fp32", "--log-every-n-steps", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    log = (tmp_path / "logs" / "oc" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Loss:" in log
    assert (tmp_path / "logs" / "oc" / "checkpoints" / "epoch_1.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["train.model=ViT-Nope"], "unknown model 'ViT-Nope'"),
    (["train.loss=softclip", "train.loss_args={alph: 0.2}"], "unexpected keyword argument 'alph'"),
    (["train.loss=softclip", "train.loss_args={target: teacher}"], "00000.parquet: missing; the loss needs the score"),
    (["train.pretrained=ROOT/other.pt"], "checkpoint .*other.pt does not fit model softcurate-tiny"),
    (["train.loss=mmcl", "train.unpaired.images=ROOT/shards/00004.tar", "train.unpaired.texts=ROOT/shards/00003.tar"],
     "no samples in .*00004.tar"),
    (["train.loss=mmcl", "train.unpaired.images=ROOT/shards/00002.tar"], "needs both train.unpaired.images and"),
    (["train.loss=mmcl", "train.unpaired.images=ROOT/captionless/00000.tar", "train.unpaired.batching=aligned"],
     "needs pool images that carry their caption"),
    (["train.loss=mmcl", "train.unpaired.images=ROOT/shards/00002.tar", "train.unpaired.texts=ROOT/shards/00003.tar",
      "train.unpaired.pairing=teacher"], "joint schedule pairs with the model at step 0, which needs trained weights"),
    (["train.loss=mmcl", "train.unpaired.schedule=sequential", "train.unpaired.steps=4"],
     "sequential trains on the unpaired pools after the pairs"),
])
def test_bad_setups_stop_before_the_first_step(root, overrides, message):
    other, *_ = open_clip.create_model_and_transforms("RN50", pretrained=None) if "pretrained" in overrides[0] else (None,)
    if other is not None:
        torch.save(other.state_dict(), root / "other.pt")
    if any("captionless" in o for o in overrides):  # an image pool of an export made before pools kept captions
        import shutil

        import webdataset as wds

        (root / "captionless").mkdir(exist_ok=True)
        with wds.TarWriter(str(root / "captionless" / "00000.tar")) as tar:
            for sample in wds.WebDataset(str(root / "shards" / "00002.tar"), shardshuffle=False):
                tar.write({"__key__": sample["__key__"], "jpg": sample["jpg"]})
        shutil.copy(root / "shards" / "00002_stats.json", root / "captionless" / "00000_stats.json")
    from pipelines.config import ConfigError

    config = config_for(root, "train.name=bad", "train.max_steps=2", *[o.replace("ROOT", str(root)) for o in overrides])
    with pytest.raises(ConfigError, match="train: cannot start: .*" + message):
        run_train(config)
    assert not (root / "runs" / "bad" / "metrics.jsonl").exists() or not losses(root / "runs" / "bad")


@pytest.mark.slow
def test_bad_samples_are_skipped_and_counted(root, tmp_path):
    import io
    import tarfile

    from train.data import make_pipeline
    from train.models import create_model

    source = root / "shards" / "00000.tar"
    broken = tmp_path / "00000.tar"
    with tarfile.open(source) as src, tarfile.open(broken, "w") as dst:
        members = src.getmembers()
        jpgs = [m.name for m in members if m.name.endswith(".jpg")]
        for m in members:
            data = src.extractfile(m).read()
            if m.name == jpgs[0]:
                data = b"<html>not an image</html>"  # undecodable
            if m.name == jpgs[1].replace(".jpg", ".txt"):
                continue  # a sample with no caption
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    _, _, preprocess, tokenizer = create_model("softcurate-tiny")
    batches = list(make_pipeline(str(broken), preprocess, tokenizer, batch_size=8))
    assert sum(b["skipped"] for b in batches) == 2
    assert sum(len(b["key"]) for b in batches) == len(jpgs) - 2


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary(root):
    command = [str(BIN / "softcurate"), "train", "--name=term", f"--root={root}", "--set", f"world.dir={root}/world",
               "--max-steps=400", "--checkpoint-every=1000", "--batch-size=32", "--workers=1", "--log-every=1",
               "--threads=1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = root / "runs" / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved, re-run to resume" in err
    state = torch.load(root / "runs" / "term" / "checkpoints" / "latest.pt", weights_only=True)
    assert 3 <= state["step"] < 400
    assert state["step"] == len(losses(root / "runs" / "term"))


@pytest.mark.slow
def test_grad_checkpointing_is_exact_and_bf16_autocast_runs(root):
    plain = run_train(config_for(root, "train.name=plain", "train.max_steps=3"))
    checkpointed = run_train(config_for(root, "train.name=gc", "train.max_steps=3", "train.grad_checkpointing=true"))
    torch.testing.assert_close(torch.tensor(losses(root / "runs" / "gc")), torch.tensor(losses(root / "runs" / "plain")))
    assert plain["steps"] == checkpointed["steps"] == 3
    run_train(config_for(root, "train.name=bf16", "train.max_steps=3", "train.precision=bf16"))
    curve = losses(root / "runs" / "bf16")
    assert len(curve) == 3 and all(map(torch.isfinite, torch.tensor(curve)))
    assert curve != losses(root / "runs" / "plain")  # autocast really changed the arithmetic


@pytest.mark.slow
def test_mmcl_sequential_with_a_frozen_teacher(root):
    config = config_for(root, "train.name=mmcl_seq", "train.loss=mmcl", "train.max_steps=6",
                        f"train.shards={root}/shards/{{00000..00001}}.tar",
                        f"train.unpaired.images={root}/shards/00002.tar", f"train.unpaired.texts={root}/shards/00003.tar",
                        "train.unpaired.batch_size=16", "train.unpaired.schedule=sequential",
                        "train.unpaired.pairing=teacher", "train.unpaired.steps=5")
    summary = run_train(config)
    assert summary["steps"] == 11  # the paired budget, then the unpaired steps on top
    rows = [json.loads(line) for line in (root / "runs" / "mmcl_seq" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [("unpaired_loss" in r) for r in steps] == [False] * 6 + [True] * 5  # pairs first, then unpaired only
    assert all(r["loss"] == r["unpaired_loss"] for r in steps[6:])


def tiny_run(root, output, **settings):
    """A run in this process on the fixture's shards (workers=0: its batches and RNG are this process's)."""
    from train.config import TrainConfig
    from train.loop import train

    common = {"shards": f"{root}/shards/{{00000..00001}}.tar", "batch_size": 16, "workers": 0, "threads": 1,
              "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "seed": 0}
    summary = train(TrainConfig(**{**common, **settings, "output": str(output)}))
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, torch.load(output / "checkpoints" / "latest.pt", weights_only=True)


def same_weights(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def test_softclip_gets_the_score_stage_teachers_tau_s_for_teacher_targets_only(tmp_path):
    from pipelines.train import resolve

    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "_summary.json").write_text(json.dumps({"teacher": {"tau_s": 0.05}}))

    def tau_s(*overrides):
        config = load_config(None, [f"root={tmp_path}", "train.shards=x.tar", "train.loss=softclip", *overrides])
        return resolve(config).train.loss_args.get("tau_s")

    assert tau_s() == 0.05 and tau_s("train.loss_args={target: teacher}") == 0.05
    assert tau_s("train.loss_args={target: self}") is None  # the student's own 1/s (SoftClipLoss's fallback)
    assert tau_s("train.loss_args={target: self, tau_s: 0.2}") == 0.2
    assert tau_s("train.loss_args={target: teacher, tau_s: 0.2}") == 0.2


@pytest.mark.slow
def test_softclip_with_alpha_and_beta_zero_trains_as_clip(root, tmp_path):
    """The degenerate setting through the whole loop: the same seed gives the same losses and weights."""
    _, clip_rows, clip = tiny_run(root, tmp_path / "clip", loss="clip", max_steps=5)
    _, soft_rows, soft = tiny_run(root, tmp_path / "soft", loss="softclip", max_steps=5,
                                  loss_args={"alpha": 0.0, "beta": 0.0, "target": "self"})
    clip_losses, soft_losses = [r["loss"] for r in clip_rows], [r["loss"] for r in soft_rows]
    assert len(clip_losses) == 5 and all(r["soft"] == r["loss"] for r in soft_rows)
    torch.testing.assert_close(torch.tensor(soft_losses), torch.tensor(clip_losses), rtol=0, atol=1e-5)
    assert clip_losses[0] != clip_losses[-1]  # it trained: equal curves are not two flat lines
    # Adam turns the losses' float32 rounding differences on near-zero gradients into steps of up to ~1e-5
    assert same_weights(soft["model"], clip["model"], atol=2e-5)


@pytest.mark.slow
def test_mmcl_teacher_is_the_stage1_model_and_survives_resume(root, tmp_path, monkeypatch):
    """Sequential MMCL: stage 1 is the CLIP-like paired run of the same config (losses, LR, weights); the
    teacher is the model at its last step; stage 2's schedule restarts; a run stopped mid stage 2 resumes
    with the saved teacher (not the resumed model) and ends as the uninterrupted run; best.pt is chosen
    in stage 2."""
    import train.loop
    from train.config import UnpairedConfig

    pools = UnpairedConfig(images=f"{root}/shards/00002.tar", texts=f"{root}/shards/00003.tar", batch_size=16,
                           schedule="sequential", steps=4, pairing="teacher")
    settings = {"loss": "mmcl", "max_steps": 4, "val_shards": f"{root}/world/val.tar"}
    _, pair_rows, pairs = tiny_run(root, tmp_path / "pairs", **settings)
    straight, rows, state = tiny_run(root, tmp_path / "straight", **settings, unpaired=pools)

    steps = [r for r in rows if "loss" in r]
    assert straight["steps"] == state["step"] == 8 and [r["step"] for r in steps] == list(range(1, 9))
    pair_steps = [r for r in pair_rows if "loss" in r]
    assert [r["loss"] for r in steps[:4]] == pytest.approx([r["loss"] for r in pair_steps], abs=1e-6)
    assert [r["lr"] for r in steps[:4]] == [r["lr"] for r in pair_steps]
    assert [r["lr"] for r in steps[4:]] == [r["lr"] for r in steps[:4]]  # stage 2: its own warmup and cosine
    assert all("unpaired_loss" in r for r in steps[4:]) and not any("unpaired_loss" in r for r in steps[:4])
    validated = [r for r in rows if "val_recall@1" in r]
    assert [r["step"] for r in validated] == [4, 8]  # stage 1's end, stage 2's end
    assert straight["best_val_recall"] == validated[1]["val_recall@1"]  # best.pt among stage-2 models

    # stopped after step 6 (stage 2's second step), as Ctrl-C would: the loop saves and raises
    real_step, calls = train.loop.train_step, []

    def stop_at_seven(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train.loop, "train_step", stop_at_seven)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 6"):
        tiny_run(root, tmp_path / "stopped", **settings, unpaired=pools)
    stopped = torch.load(tmp_path / "stopped" / "checkpoints" / "latest.pt", weights_only=True)
    assert stopped["step"] == 6
    assert same_weights(stopped["teacher"], pairs["model"])  # the model at stage 1's last step
    assert not same_weights(stopped["teacher"], stopped["model"])  # stage 2 has trained the model since
    assert not same_weights(stopped["teacher"], state["model"])

    teachers = []

    def record_teacher(run, ddp, optimizer, batch, autocast, scale_range, unpaired, teacher):
        teachers.append({k: v.clone() for k, v in teacher.state_dict().items()})
        return real_step(run, ddp, optimizer, batch, autocast, scale_range, unpaired, teacher)

    monkeypatch.setattr(train.loop, "train_step", record_teacher)
    resumed, resumed_rows, final = tiny_run(root, tmp_path / "stopped", **settings, unpaired=pools)
    assert len(teachers) == 2 and same_weights(teachers[0], stopped["teacher"])
    untimed = [[{k: v for k, v in r.items() if k != "samples_per_s"} for r in run] for run in (resumed_rows, rows)]
    assert resumed["steps"] == 8 and untimed[0] == untimed[1]
    assert same_weights(final["model"], state["model"]) and same_weights(final["teacher"], state["teacher"])


@pytest.mark.slow
def test_softclip_with_teacher_scores_and_adaptive_alpha(root, tmp_path):
    """The score stage's fields (teacher embeddings, clean_prob) reach the loss through the loader."""
    import shutil

    import polars as pl

    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    (tmp_path / "scores").mkdir()
    generator = torch.Generator().manual_seed(0)
    for path in sorted(shards.glob("0*.parquet")):
        keys = pl.read_parquet(path).filter(pl.col("status") == "success")["key"]
        n = len(keys)
        pl.DataFrame({"key": keys, "clean_prob": torch.rand(n, generator=generator).tolist(),
                      "teacher_image_emb": torch.randn(n, 8, generator=generator).half().tolist(),
                      "teacher_text_emb": torch.randn(n, 8, generator=generator).half().tolist()}).write_parquet(
            tmp_path / "scores" / path.name)
    config = config_for(root, "train.name=softclip_teacher", "train.loss=softclip", "train.max_steps=20",
                        f"train.shards={shards}/{{00000..00003}}.tar",
                        "train.loss_args={target: teacher, alpha_min: 0.1, alpha_max: 0.5, beta: 1.0}")
    run_train(config)
    curve = losses(root / "runs" / "softclip_teacher")
    assert len(curve) == 20 and falls(curve)
    rows = [json.loads(line) for line in (root / "runs" / "softclip_teacher" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["neg"] > 0 and r["soft"] > 0 for r in rows if "loss" in r)


@pytest.mark.slow
def test_a_new_loss_gets_what_it_declares_from_a_config_built_in_a_notebook(root, tmp_path, monkeypatch):
    """A loss added without touching the loop: it declares a score column, that it takes no weights, and its
    logit-scale range; `train(TrainConfig(...))` passes the column's values of each batch's keys and keeps
    s in the range."""
    import shutil

    import polars as pl

    from train.config import TrainConfig
    from train.loop import train
    from train.losses import LOSSES, ClipLoss

    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    (tmp_path / "scores").mkdir()
    for path in sorted(shards.glob("0*.parquet")):
        keys = pl.read_parquet(path).filter(pl.col("status") == "success")["key"]
        pl.DataFrame({"key": keys, "clean_prob": [0.5] * len(keys),
                      "noise_hint": [int(k) % 11 / 10 for k in keys]}).write_parquet(tmp_path / "scores" / path.name)
    seen = []

    class Probe(ClipLoss):
        score_fields = {"hint": "noise_hint"}
        takes_weight = False
        logit_scale_init, logit_scale_min, logit_scale_max = 2.0, 1.5, 2.5

        def forward(self, image_features, text_features, logit_scale, hint):
            seen.append((hint.clone(), logit_scale.item()))
            return super().forward(image_features, text_features, logit_scale)

    monkeypatch.setitem(LOSSES, "probe", Probe)
    # workers=0: the batches come from this process, so the probe's record is ours to read
    cfg = TrainConfig(shards=f"{shards}/{{00000..00003}}.tar", output=str(tmp_path / "run"), loss="probe", max_steps=6,
                      batch_size=16, workers=0, threads=1, lr=5e-2, warmup_steps=0, log_every=1)
    summary = train(cfg)
    assert summary["steps"] == 6 and len(seen) == 6
    assert seen[0][1] == pytest.approx(2.0)  # the loss's init, not open_clip's 1/0.07
    assert all(1.5 - 1e-5 <= scale <= 2.5 + 1e-5 for _, scale in seen)
    assert any(scale != pytest.approx(2.0) for _, scale in seen[1:])  # it moved, within the range
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    # the values it got are the scores of the batch's keys, not of other samples
    hints = torch.cat([h for h, _ in seen])
    assert set(hints.mul(10).round().tolist()) <= set(range(11)) and hints.std() > 0
    # a keep-list that weights its pairs is refused for a loss that declares it takes no weights
    keys = pl.concat([pl.read_parquet(p, columns=["key"]) for p in sorted((tmp_path / "scores").glob("*.parquet"))])["key"]
    pl.DataFrame({"key": keys, "keep": [True] * len(keys), "weight": [0.5] * len(keys)}).write_parquet(tmp_path / "keep.parquet")
    from train.loop import SetupError

    with pytest.raises(SetupError, match="weights its pairs, but the probe loss takes no weights"):
        train(cfg.model_copy(update={"keep_list": str(tmp_path / "keep.parquet"), "output": str(tmp_path / "run2")}))
