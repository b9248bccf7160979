"""Audit and curate end to end on the scored demo root (conftest's `scored`): the page in Chromium,
the keep-list, the exported shards and pools, and training on them."""

import json
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import webdataset as wds
import yaml
from conftest import BIN, N, config_for

from pipelines.audit import run_audit
from pipelines.curate import run_curate
from pipelines.train import run_train

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def open_in_chromium(page, screenshot):
    """(console errors, images, images that did not load) of a page opened from disk in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(f"file://{page}")
        images = tab.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        tab.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return errors, len(images), sum(1 for w in images if w == 0)


def test_audit_page_renders_with_every_figure_and_thumbnail(scored, tmp_path):
    root, score_summary = scored
    config = config_for(root, f"audit.output={tmp_path / 'audit'}")
    facts = run_audit(config)
    counts = facts["counts"]
    assert counts["reconciled"] and counts["input_rows"] == N + 1 and counts["scored"] == N
    assert facts["noise"]["ci_low"] <= facts["noise"]["estimated_rate"] <= facts["noise"]["ci_high"]
    assert facts["noise"]["estimated_rate"] == pytest.approx(score_summary["noise"]["estimated_rate"], rel=1e-5)
    detection = {row["score"]: row for row in facts["detection"]["rows"]}
    assert detection["clean_prob"]["auroc"] == pytest.approx(score_summary["detection"]["auroc"]["clean_prob"])
    assert 0 < detection["clean_prob"]["precision"] <= 1 and 0 < detection["cosine"]["recall"] <= 1
    for name in ("index.html", "summary.json", "loss.png", "cosine.png", "clean_prob.png", "dn_score.png", "policies.png"):
        assert (tmp_path / "audit" / name).stat().st_size > 0, name
    errors, images, broken = open_in_chromium(tmp_path / "audit" / "index.html", tmp_path / "audit.png")
    assert errors == [] and broken == 0
    assert images >= 5 + 3 * 12  # the figures and three full galleries of thumbnails
    assert (tmp_path / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_reports_missing_scores_and_goes_on(scored, tmp_path):
    root, _ = scored
    copy = tmp_path / "copy"
    for part in ("shards", "scores", "world"):
        shutil.copytree(root / part, copy / part)
    (copy / "scores" / "00001.parquet").unlink()
    facts = run_audit(config_for(copy))
    assert facts["missing_scores"] == ["00001"]
    assert facts["counts"]["scored"] == N - 400
    assert "00001" in (copy / "audit" / "index.html").read_text()


def test_a_labels_table_of_a_users_own_by_url_or_key_gives_the_same_detection(scored, tmp_path):
    """`--truth` takes any labels table: by url (CSV) or by key (Parquet), it reports what the world's own
    truth (by row) does; a table without the columns it needs is a one-line error."""
    root, score_summary = scored
    shards = pl.concat([pl.read_parquet(p, columns=["key", "url", "row"]) for p in sorted((root / "shards").glob("0*.parquet"))])
    world = pl.read_parquet(root / "world" / "truth.parquet", columns=["row", "noisy"])
    labels = shards.join(world, on="row").with_columns(noisy=pl.col("noisy").cast(pl.Int8))  # 0/1, as a CSV would have it
    labels.select("url", "noisy").write_csv(tmp_path / "by_url.csv")
    labels.select("key", pl.col("noisy").cast(pl.Boolean)).write_parquet(tmp_path / "by_key.parquet")
    expected = {row["score"]: row["auroc"] for row in run_audit(config_for(root, f"audit.output={tmp_path / 'world'}"))
                ["detection"]["rows"]}
    for table in ("by_url.csv", "by_key.parquet"):
        out = tmp_path / f"audit_{table.split('.')[0]}"
        done = subprocess.run([str(BIN / "softcurate"), "audit", "--root", str(root),
                               "--truth", str(tmp_path / table), "--set", f"audit.output={out}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows = json.loads((out / "summary.json").read_text())["detection"]["rows"]
        assert {row["score"]: row["auroc"] for row in rows} == pytest.approx(expected)
    assert expected["clean_prob"] == pytest.approx(score_summary["detection"]["auroc"]["clean_prob"])
    labels.select("url").write_csv(tmp_path / "no_noisy.csv")
    done = subprocess.run([str(BIN / "softcurate"), "audit", "--root", str(root), "--truth",
                           str(tmp_path / "no_noisy.csv"), "--set", f"audit.output={tmp_path / 'bad'}"], capture_output=True, text=True)
    assert done.returncode == 2 and "needs a column noisy and one of key, url, row" in done.stderr
    assert "Traceback" not in done.stderr


def test_curate_keep_list_export_and_pools_reconcile(scored, tmp_path):
    root, _ = scored
    out = tmp_path / "curated"
    summary = run_curate(config_for(root, f"curate.output={out}", "curate.samples_per_shard=300"), export=True)
    keep = pl.read_parquet(out / "keep.parquet")
    assert keep.columns == ["key", "keep", "weight", "reason"] and len(keep) == N
    kept = keep.filter(pl.col("keep"))
    assert summary["kept"] == len(kept) and keep.filter(~pl.col("keep"))["reason"].null_count() == 0
    scores = pl.read_parquet(root / "scores" / "0*.parquet", columns=["key", "clean_prob"])
    assert set(kept["key"]) == set(scores.filter(pl.col("clean_prob") >= 0.5)["key"])
    export = summary["export"]
    sizes = [json.loads((out / f"{i:05d}_stats.json").read_text())["successes"] for i in range(len(export["shards"]["shards"]))]
    assert sum(sizes) == len(kept) and max(sizes) - min(sizes) <= 1 and max(sizes) <= 300  # evenly sized
    samples = list(wds.WebDataset(export["shards"]["urls"], shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(kept["key"])
    fields = samples[0]["json"]["softcurate"]
    assert set(fields) == {"cosine", "dn_score", "loss", "clean_prob", "weight"} and fields["clean_prob"] >= 0.5
    dropped = N - len(kept)
    assert export["unpaired_images"]["samples"] == dropped
    assert export["unpaired_texts"]["samples"] == dropped + 1  # and the caption whose url gave 404
    texts = list(wds.WebDataset(export["unpaired_texts"]["urls"], shardshuffle=False))
    assert all("txt" in s and "jpg" not in s for s in texts)
    images = list(wds.WebDataset(export["unpaired_images"]["urls"], shardshuffle=False))
    caption = {s["__key__"]: s["txt"] for s in texts}
    assert all("jpg" in s for s in images)  # every image dropped for a mismatch keeps its caption (aligned batching)
    assert [s["txt"] for s in images] == [caption[s["__key__"]] for s in images]


def test_a_policy_that_keeps_nothing_warns_and_training_refuses_it(scored, tmp_path, capsys):
    root, _ = scored
    out = tmp_path / "none"
    summary = run_curate(config_for(root, f"curate.output={out}", "curate.policy=[{kind: clean_prob, min: 1.0}]"),
                         export=True)
    assert summary["kept"] == 0 and "export" not in summary and not list(out.glob("*.tar"))
    assert "keeps none of the" in capsys.readouterr().out
    result = subprocess.run([str(BIN / "softcurate"), "train", "--root", str(root), "--keep-list", str(out / "keep.parquet"),
                             "--max-steps", "2", "--name", "nothing"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "keeps none of its" in result.stderr


def test_training_on_the_reweighted_keep_list_and_open_clip_on_the_export(scored, tmp_path):
    root, _ = scored
    out = tmp_path / "weighted"
    run_curate(config_for(root, f"curate.output={out}", "curate.policy=[{kind: reweight, by: clean_prob}]"), export=False)
    result = run_train(config_for(root, "train.name=weighted", f"train.keep_list={out / 'keep.parquet'}", "train.max_steps=6",
                                  "train.epoch_checkpoints=false"))
    assert result["steps"] == 6 and np.isfinite(result["last"]["loss"])
    export = run_curate(config_for(root, f"curate.output={tmp_path / 'export'}"), export=True)["export"]["shards"]
    import train.models

    model_dir = tmp_path / "tiny"  # open_clip's trainer takes our model as a local-dir config
    model_dir.mkdir()
    model_cfg = json.loads((train.models.CONFIG_DIR / "softcurate-tiny.json").read_text())
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    run = subprocess.run(
        [sys.executable, "-m", "open_clip_train.main", "--train-data", export["urls"], "--train-num-samples",
         str(export["samples"]), "--dataset-type", "webdataset", "--model", f"local-dir:{model_dir}", "--batch-size", "32",
         "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--warmup", "1", "--logs", str(tmp_path / "logs"),
         "--name", "curated", "--save-frequency", "1", "--report-to", "", "--device", "cpu", "--precision", "fp32",
         "--log-every-n-steps", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert (tmp_path / "logs" / "curated" / "checkpoints" / "epoch_1.pt").exists()


def test_an_empty_dataset_gives_a_report_and_a_refused_keep_list(tmp_path):
    """Every sample failed to score: the audit still writes its page (with a warning), curate keeps nothing."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "scores").mkdir()
    keys = [f"00000{i:04d}" for i in range(5)]
    pl.DataFrame({"key": keys, "url": [f"http://example.com/{k}.jpg" for k in keys], "caption": [""] * 5,
                  "status": ["success"] * 5}).write_parquet(tmp_path / "shards" / "00000.parquet")
    (tmp_path / "shards" / "_summary.json").write_text(json.dumps({"shards": ["00000.tar"], "counts": {
        "input_rows": 5, "rejected": 0, "failures": 0}, "failures_by_reason": []}))
    empty = pl.Series([None] * 5, dtype=pl.Float32)
    pl.DataFrame({"key": keys, "row": list(range(5)), "status": ["failed"] * 5, "error": ["empty caption"] * 5,
                  "cosine": empty, "dn_score": empty, "loss": empty, "clean_prob": empty,
                  "image_nn_keys": pl.Series([None] * 5, dtype=pl.List(pl.String)),
                  "image_nn_sims": pl.Series([None] * 5, dtype=pl.List(pl.Float32)),
                  "text_nn_keys": pl.Series([None] * 5, dtype=pl.List(pl.String)),
                  "text_nn_sims": pl.Series([None] * 5, dtype=pl.List(pl.Float32))}
                 ).write_parquet(tmp_path / "scores" / "00000.parquet")
    config = config_for(tmp_path)
    facts = run_audit(config)
    assert facts["counts"]["failed"] == 5 and facts["counts"]["reconciled"]
    assert "no pair could be scored" in (tmp_path / "audit" / "index.html").read_text()
    assert run_curate(config, export=True)["kept"] == 0


def test_compare_trains_each_row_once_and_tables_them_beside_the_teacher(scored, tmp_path):
    """The compare stage (the demo's students): a CLIP row on the raw shards and SoftCLIP through a keep-list,
    one budget, each evaluated; the table and curves written; a re-run trains nothing."""
    from pipelines.compare import run_compare

    root, score_summary = scored
    rows = ("{cmp_clip: {loss: clip}, cmp_softclip: {baseline: cmp_clip, loss: softclip, loss_args: {alpha: 0.2, beta: 1.0, target: teacher},"
            " curate: [{kind: clean_prob, min: 0.5}]}}")
    config = config_for(root, f"compare.output={tmp_path}", f"compare.rows={rows}", "evaluate.dn_seeds=2",
                        "compare.budget={max_steps: 4, batch_size: 32, warmup_steps: 1, workers: 1, checkpoint_every: 100, log_every: 1}")
    summary = run_compare(config)
    assert set(summary["rows"]) == {"cmp_clip", "cmp_softclip"} and summary["teacher"]["best val R@1"] > 0
    soft = json.loads((tmp_path / "cmp_softclip_s0.json").read_text())
    assert soft["steps"] == 4 and soft["train"]["loss"] == "softclip" and soft["loss_last"] > 0
    resolved = yaml.safe_load((root / "runs" / "compare_cmp_softclip_s0" / "_config.yaml").read_text())
    assert resolved["train"]["loss_args"]["tau_s"] == pytest.approx(score_summary["teacher"]["tau_s"])  # the teacher's temperature
    kept = pl.read_parquet(soft["train"]["keep_list"])
    assert 0 < kept["keep"].sum() < kept.height  # trained on the curated pairs, not all of them
    assert json.loads((tmp_path / "cmp_clip_s0.json").read_text())["train"]["keep_list"] is None
    for row in summary["rows"].values():
        assert 0.0 <= row["R@1 dot"]["mean"] <= 1.0 and row["colour top1 dn"]["seeds"] == 1
    table = (tmp_path / "table.md").read_text()
    assert "| cmp_clip | 1 |" in table and "| teacher (teacher, clip) | " in table and "R@1 dn" in table
    gain = summary["versus"]["cmp_softclip"]
    assert gain["baseline"] == "cmp_clip" and gain["gain"] == pytest.approx(
        [summary["rows"]["cmp_softclip"]["R@1 dot"]["mean"] - summary["rows"]["cmp_clip"]["R@1 dot"]["mean"]])
    assert "| cmp_softclip | cmp_clip | " in table
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    checkpoints = sorted((root / "runs").glob("compare_cmp_*_s0/checkpoints/best.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in [*checkpoints, *tmp_path.glob("*.json")] if p.name != "summary.json"}
    assert len(checkpoints) == 2
    run_compare(config)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
