"""The efficacy run's reduced version, as CI runs it: one seed, three rows, a few steps on a tiny world."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_efficacy_smoke_run_trains_every_row_and_writes_the_table(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "efficacy.py"), "--smoke", "--results", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "noise20").glob("*_s0.json"))
    assert [r.name for r in runs] == ["clip_curated_cosine_top_s0.json", "clip_raw_s0.json", "softclip_teacher_s0.json"]
    for path in runs:
        run = json.loads(path.read_text())
        assert run["steps"] == 12 and run["loss_last"] < run["loss_first"], (path.name, run["loss_first"], run["loss_last"])
        assert run["val_curve"] and {"dot", "dn", "dn_std"} <= set(run["test"]["retrieval"])
    table = (tmp_path / "noise20" / "rows.md").read_text()
    assert "| clip_raw | 1 |" in table and "R@1 dn" in table and "noise detection" in table
    curves = (tmp_path / "noise20" / "rows_curves.png").read_bytes()
    assert curves.startswith(b"\x89PNG") and len(curves) > 5000  # a drawn figure, not an empty canvas
