"""The efficacy run's reduced version, as CI runs it: one seed, three rows, a few steps on a tiny world."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("efficacy", ROOT / "bench" / "efficacy.py")
efficacy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(efficacy)


@pytest.mark.slow
def test_efficacy_smoke_run_trains_every_row_with_both_teachers_and_writes_the_table(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "efficacy.py"), "--smoke", "--results", str(tmp_path)],
                            capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "noise20").glob("*_s0.json"), key=lambda p: p.name.removesuffix("_s0.json"))
    assert [r.name.removesuffix("_s0.json") for r in runs] == [
        "clip_curated_cosine_top", "clip_curated_cosine_top_pretrained", "clip_oracle", "clip_raw",
        "softclip_teacher", "softclip_teacher_pretrained"]
    for path in runs:
        run = json.loads(path.read_text())
        assert run["steps"] == 12 and run["loss_last"] < run["loss_first"], (path.name, run["loss_first"], run["loss_last"])
        assert run["val_curve"] and {"dot", "dn", "dn_std"} <= set(run["test"]["retrieval"])
    by_name = {r.name.removesuffix("_s0.json"): json.loads(r.read_text())["train"] for r in runs}
    assert by_name["clip_oracle"]["shards"].count("/oracle/shards/") >= 1
    assert by_name["softclip_teacher_pretrained"]["scores"].endswith("scores_pretrained")
    assert by_name["softclip_teacher"]["scores"].endswith("/scores")
    # each teacher's own temperature reaches its SoftCLIP row
    assert by_name["softclip_teacher"]["loss_args"]["tau_s"] != by_name["softclip_teacher_pretrained"]["loss_args"]["tau_s"]
    table = (tmp_path / "noise20" / "rows.md").read_text()
    assert "| clip_raw | 1 |" in table and "R@1 dn" in table and "noise detection" in table
    assert "| softclip_teacher_pretrained | clip_raw |" in table and "gap recovered (clip_raw -> clip_oracle)" in table
    found = (tmp_path / "noise20" / "detection.md").read_text()  # detection by each teacher, by kind of noise
    assert "**self teacher**" in found and "**pretrained teacher**" in found and "| unrelated_caption |" in found
    [build] = json.loads((tmp_path / "noise20" / "inputs.json").read_text())["builds"]  # what --tables-only reads
    assert build["seeds"] == [0] and "torch" in build["machine"]
    assert set(build["detection"]) == {"self", "pretrained"} and "unrelated_caption" in build["detection"]["pretrained"]["by_kind"]
    assert any(k.startswith("self/") for k in build["scores"]) and any(k.startswith("pretrained/") for k in build["scores"])
    assert json.loads(runs[0].read_text())["machine"] == build["machine"]
    curves = (tmp_path / "noise20" / "rows_curves.png").read_bytes()
    assert curves.startswith(b"\x89PNG") and len(curves) > 5000  # a drawn figure, not an empty canvas


def run(row: str, seed: int, dot: float, dn: float) -> dict:
    """A result as run_row writes it, reduced to what the table reads."""
    retrieval = {space: {"i2t_R@1": r, "t2i_R@1": r} for space, r in (("dot", dot), ("dn", dn))}
    return {"row": row, "seed": seed, "best_val_recall": dot,
            "test": {"zero_shot": {"colour": {"dot": {"top1": 0.5}, "dn": {"top1": 0.5}}}, "retrieval": retrieval}}


def test_gains_are_paired_by_seed_and_count_the_seeds_that_gain():
    from pipelines.compare import table, versus

    results = [run("clip", 0, 0.10, 0.10), run("clip", 1, 0.20, 0.19), run("clip", 2, 0.30, 0.31),
               run("soft", 0, 0.15, 0.15), run("soft", 1, 0.18, 0.20)]  # seed 2 of soft missing: not paired
    gains = versus(results, {"clip": {}, "soft": {"baseline": "clip"}})
    assert gains["clip"]["baseline"] is None and gains["clip"]["gain"] == []
    assert gains["soft"]["gain"] == pytest.approx([0.05, -0.02])  # per seed, not mean(soft) - mean(clip)
    assert gains["clip"]["dn_gain"] == pytest.approx([0.0, -0.01, 0.01])
    text = table("t", results, None, {"clip": {}, "soft": {"baseline": "clip"}})
    assert "| soft | clip | +0.015 +- 0.035 (1/2 > 0) | +0.010 +- 0.010 (1/2 > 0) |" in text


def test_a_stored_result_of_other_settings_is_refused_not_reused(tmp_path):
    """Rows are resumed by name: an edited row must not silently reuse the result of its old settings."""
    from pipelines.compare import run_once
    from pipelines.config import ConfigError

    stored = {**run("soft", 0, 0.1, 0.1), "train": {"loss": "softclip", "max_steps": 450, "loss_args": {"alpha": 0.2, "tau_s": 0.07}}}
    (tmp_path / "soft_s0.json").write_text(json.dumps(stored))
    budget = {"max_steps": 450}
    # the same settings (the stored config may hold more, e.g. the teacher's tau_s): reused without training
    assert run_once(None, "soft", {"loss": "softclip", "loss_args": {"alpha": 0.2}, "baseline": "clip"}, 0, budget,
                    str(tmp_path)) == stored
    with pytest.raises(ConfigError, match=r"soft_s0.json was trained with loss_args.alpha: 0.2, not 0.4"):
        run_once(None, "soft", {"loss": "softclip", "loss_args": {"alpha": 0.4}}, 0, budget, str(tmp_path))
    with pytest.raises(ConfigError, match=r"max_steps: 450, not 900"):
        run_once(None, "soft", {"loss": "softclip"}, 0, {"max_steps": 900}, str(tmp_path))


def test_the_cross_world_table_puts_each_rows_gain_in_every_world_side_by_side():
    rows = {"clip": {}, "soft": {"baseline": "clip"}}
    by_world = {"w20": [run("clip", 0, 0.10, 0.10), run("soft", 0, 0.14, 0.14), run("clip", 1, 0.20, 0.2), run("soft", 1, 0.22, 0.2)],
                "w40": [run("clip", 0, 0.05, 0.05), run("soft", 0, 0.04, 0.04)]}
    text = efficacy.across(by_world, rows)
    assert "| soft | clip | 0.180 +- 0.040 (2) | +0.030 +- 0.010 (2/2 > 0) | 0.040 +- 0.000 (1) | -0.010 +- 0.000 (0/1 > 0) |" in text
    assert "| clip |  | 0.150 +- 0.050 (2) |  | 0.050 +- 0.000 (1) |  |" in text


def test_the_results_document_gets_the_current_tables_between_its_markers(tmp_path):
    (tmp_path / "w20").mkdir()
    (tmp_path / "w20" / "rows.md").write_text("### w20\n\nnoise detection (AUROC ...): clean_prob 0.9\n\n| row | R@1 |\n|---|---|\n| clip | 0.2 |\n")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\ntext before\n<!-- table w20/rows.md -->\n| row | R@1 |\n| clip | 0.1 |\n<!-- end table -->\ntext after\n")
    efficacy.refresh(doc, tmp_path)
    assert doc.read_text() == ("# R\n\ntext before\n<!-- table w20/rows.md -->\n| row | R@1 |\n|---|---|\n| clip | 0.2 |\n"
                               "<!-- end table -->\ntext after\n")


def test_soft_target_mass_follows_what_the_embedding_encodes():
    """bench/soft_targets.py: a colour-only embedding puts its target mass on same-colour pairs, shape at chance."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("soft_targets", ROOT / "bench" / "soft_targets.py")
    soft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soft)
    rng = np.random.default_rng(0)
    colour, shape = rng.integers(0, 6, 3000), rng.integers(0, 6, 3000)
    x = np.eye(6)[colour] + 0.05 * rng.standard_normal((3000, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = soft.target_mass(x, {"colour": colour, "shape": shape}, tau=0.05, batch=128, draws=20, seed=0)
    assert m["colour"] > 0.9 and m["colour chance"] == pytest.approx(1 / 6, abs=0.02)
    assert m["shape"] == pytest.approx(m["shape chance"], abs=0.03)


def test_pseudo_pair_accuracy_follows_the_batching():
    """bench/pseudo_pairs.py: with embeddings that know every pair, aligned batches find the true caption of
    each clean row and of nothing else; independent batches rarely hold it at all."""
    import numpy as np
    import polars as pl

    spec = importlib.util.spec_from_file_location("pseudo_pairs", ROOT / "bench" / "pseudo_pairs.py")
    pseudo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pseudo)
    n, rng = 2000, np.random.default_rng(0)
    truth = [f"scene {i}" for i in range(n)]
    noisy = rng.random(n) < 0.4
    caption = [f"scene {(i + 1) % n}" if bad else truth[i] for i, bad in enumerate(noisy)]  # a noisy row: another's caption
    scene = rng.standard_normal((n, 32))
    described = [int(c.split()[1]) for c in caption]
    rows = pl.DataFrame({"teacher_image_emb": scene, "teacher_text_emb": scene[described],
                         "caption": caption, "clean_caption": truth})
    aligned = pseudo.draw(rows, "aligned", 64, 50, seed=0)
    independent = pseudo.draw(rows, "independent", 64, 50, seed=0)
    assert aligned["true caption in batch"] == pytest.approx(1 - noisy.mean(), abs=0.03)
    assert aligned["argmax text is true"] == pytest.approx(aligned["true caption in batch"], abs=0.02)
    assert independent["true caption in batch"] < 0.1 and independent["argmax text is true"] < 0.1


def test_gap_recovered_is_the_rows_share_of_the_raw_to_oracle_gap_paired_by_seed():
    from pipelines.compare import table, versus

    results = [run("raw", 0, 0.10, 0.10), run("oracle", 0, 0.30, 0.30), run("cur", 0, 0.25, 0.25),
               run("raw", 1, 0.20, 0.20), run("oracle", 1, 0.40, 0.40), run("cur", 1, 0.20, 0.20)]
    rows = {"raw": {}, "oracle": {}, "cur": {"baseline": "raw"}}
    gains = versus(results, rows, {"raw": "raw", "oracle": "oracle"})
    assert gains["cur"]["recovered"] == pytest.approx([0.75, 0.0])  # per seed, not from the means
    assert gains["oracle"]["recovered"] == pytest.approx([1.0, 1.0]) and gains["raw"]["recovered"] == [0.0, 0.0]
    assert "| cur | raw | +0.075 +- 0.075 (1/2 > 0) | +0.000 +- 0.000 (0/2 > 0) | 38% +- 38% (2) |" in \
        table("t", results, None, rows, {"raw": "raw", "oracle": "oracle"})
    for oracle in (0.10, 0.10 + 1e-8, 0.115):  # level, or above raw by less than a test split resolves
        level = [run("raw", 0, 0.10, 0.10), run("oracle", 0, oracle, oracle), run("cur", 0, 0.12, 0.12)]
        assert versus(level, rows, {"raw": "raw", "oracle": "oracle"})["cur"]["recovered"] == []  # no gap: no share
        assert "no gap (oracle - raw < 0.02)" in table("t", level, None, rows, {"raw": "raw", "oracle": "oracle"})


def test_where_retrieval_saturates_the_gap_is_read_in_the_hard_attribute():
    """Raw and oracle level in R@1 (both at the test split's ceiling) but apart in shape: the share of the shape
    gap is reported beside R@1's (which has no gap to share)."""
    from pipelines.compare import table, versus

    def with_shape(row, seed, r1, shape):
        result = run(row, seed, r1, r1)
        result["test"]["zero_shot"]["shape"] = {"dot": {"top1": shape}, "dn": {"top1": shape}}
        return result
    results = [with_shape("raw", 0, 0.28, 0.50), with_shape("oracle", 0, 0.28 + 1e-8, 1.00), with_shape("cur", 0, 0.28, 0.90)]
    rows, gap = {"raw": {}, "oracle": {}, "cur": {"baseline": "raw"}}, {"raw": "raw", "oracle": "oracle"}
    gains = versus(results, rows, gap)
    assert gains["cur"]["recovered"] == [] and gains["cur"]["recovered_hard"] == pytest.approx([0.8])
    assert "| no gap (oracle - raw < 0.02) | 80% +- 0% (1) |" in table("t", results, None, rows, gap)


def test_a_row_run_by_several_teachers_reads_each_teachers_scores_and_keeps_its_baseline_in_step():
    scores = {"pretrained": {"output": "/w/scores_pretrained", "model": "m", "checkpoints": ["/t/best.pt"]}}
    rows = {"raw": {"loss": "clip"},
            "soft": {"baseline": "raw", "loss": "softclip", "teachers": ["self", "pretrained"]},
            "adaptive": {"baseline": "soft", "loss": "softclip", "teachers": ["self", "pretrained"]}}
    plan = efficacy.expand_rows(rows, scores)
    assert list(plan) == ["raw", "soft", "soft_pretrained", "adaptive", "adaptive_pretrained"]
    assert "score" not in plan["soft"] and plan["soft_pretrained"]["score"] == scores["pretrained"]
    assert plan["soft_pretrained"]["baseline"] == "raw"  # raw runs once: the same baseline for both teachers
    assert plan["adaptive_pretrained"]["baseline"] == "soft_pretrained" and plan["adaptive"]["baseline"] == "soft"
    assert all("teachers" not in row for row in plan.values())


def test_training_reads_scores_from_the_folder_it_is_given():
    from train.data import scores_path

    assert scores_path("/w/shards/00003.tar") == "/w/scores/00003.parquet"
    assert scores_path("/w/shards/00003.tar", "s3://b/scores_pretrained/") == "s3://b/scores_pretrained/00003.parquet"


def test_a_row_held_by_one_process_is_passed_over_by_another(tmp_path):
    """--rows-only processes share the rows: a lock held by a live process is not taken; once let go, it is."""
    lock = tmp_path / "noise20" / "clip_raw_s0.lock"
    probe = [sys.executable, "-c", f"import importlib.util, sys; s = importlib.util.spec_from_file_location('e', {str(ROOT / 'bench' / 'efficacy.py')!r}); "
             f"e = importlib.util.module_from_spec(s); s.loader.exec_module(e)\nwith e.held(e.Path({str(lock)!r})) as mine: print(mine)"]
    with efficacy.held(lock) as mine:
        assert mine
        assert subprocess.run(probe, capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"
    assert subprocess.run(probe, capture_output=True, text=True, cwd=ROOT).stdout.strip() == "True"


def test_a_seed_is_trained_on_one_build_of_its_inputs(tmp_path):
    """Scores rebuilt on another CPU model differ (its floats round otherwise): a seed begun on one build is not
    resumed on another, and a new build claims the seeds no build has begun."""
    here = {"scores": {"self/00000.parquet": "aa"}, "detection": {}}
    there = {"scores": {"self/00000.parquet": "bb"}, "detection": {}}
    assert efficacy.claim(tmp_path, 0, here) and efficacy.claim(tmp_path, 0, here)  # claimed, then resumed
    assert not efficacy.claim(tmp_path, 0, there)
    assert efficacy.claim(tmp_path, 1, there) and efficacy.claim(tmp_path, 2, here)
    builds = json.loads((tmp_path / "inputs.json").read_text())["builds"]
    assert [(b["scores"]["self/00000.parquet"], b["seeds"]) for b in builds] == [("aa", [0, 2]), ("bb", [1])]
    assert "(seeds: 0, 2)" in efficacy.builds_table({"builds": builds})


def test_the_oracle_gives_each_pair_its_true_caption_and_the_full_caption_oracle_only_those_pairs(tmp_path):
    import webdataset as wds
    from conftest import demo_shard_overrides, make_demo_shards

    from pipelines.config import load_config
    from pipelines.world import world_truth
    from train.data import count_samples

    root = make_demo_shards(tmp_path, 80, per_shard=40)
    config = load_config(None, [f"root={root}", *demo_shard_overrides(root / "world", 80, 40)])
    truth = {row: (caption, partial) for row, caption, partial in
             world_truth(config, ("row", "clean_caption", "partial")).iter_rows()}
    assert 0 < sum(partial for _, partial in truth.values()) < len(truth)  # both kinds of caption are there
    shards = efficacy.finished_shards(config)
    sharded = {json.loads(s["json"])["row"] for url in shards for s in wds.WebDataset(url, shardshuffle=False)}
    for kind in (efficacy.ORACLE, efficacy.ORACLE_FULL):
        full_only = kind == efficacy.ORACLE_FULL
        urls = efficacy.oracle_shards(config, kind).split("::")
        pairs = {json.loads(s["json"])["row"]: s["txt"].decode() for url in urls for s in wds.WebDataset(url, shardshuffle=False)}
        assert set(pairs) == {row for row in sharded if not (full_only and truth[row][1])}
        assert all(caption == truth[row][0] for row, caption in pairs.items())
        assert count_samples(urls) == len(pairs)  # the stats the train stage sizes its epochs by
