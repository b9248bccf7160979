"""The noise-audit report: figures are real PNGs, the page escapes web text and fetches nothing."""

import io
import os
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curate.report import figure_files, histograms, policy_curves, render_page

CHROMIUM = "/usr/bin/chromium"
MIXTURE = {"weights": [0.7, 0.3], "means": [1.0, 3.0], "variances": [0.09, 0.36]}
EVIL_CAPTION = "<script>alert(1)</script>"
EVIL_URL = 'http://example.com/a.jpg"><img src=x onerror=alert(1)>'


def synthetic_table(n: int = 2000, seed: int = 0) -> pl.DataFrame:
    """Clean pairs score high, 30% noisy pairs low; a few nulls as failed rows leave them."""
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < 0.3
    cosine = np.where(noisy, rng.normal(0.15, 0.04, n), rng.normal(0.32, 0.04, n))
    dn = np.where(noisy, rng.normal(-0.05, 0.05, n), rng.normal(0.12, 0.05, n))
    loss = np.where(noisy, rng.normal(3.0, 0.6, n), rng.normal(1.0, 0.3, n))
    prob = np.where(noisy, rng.beta(2, 8, n), rng.beta(8, 2, n))
    table = pl.DataFrame({"cosine": cosine, "dn_score": dn, "loss": loss, "clean_prob": prob, "noisy": noisy})
    table = table.with_columns(pl.col("cosine", "dn_score", "loss", "clean_prob").cast(pl.Float32))
    nulls = pl.Series(np.arange(n) % 97 == 5)
    return table.with_columns(pl.when(nulls).then(None).otherwise(pl.col(c)).alias(c) for c in ("cosine", "loss"))


CURVES = {
    "clean_prob": {"threshold": list(np.linspace(0, 1, 21)), "kept_fraction": list(np.linspace(1, 0, 21) ** 0.5),
                   "label": "min clean_prob"},
    "cosine": {"threshold": list(np.linspace(0.0, 0.4, 21)), "kept_fraction": list(np.linspace(1, 0, 21) ** 2),
               "label": "min cosine"},
    "top_k": {"threshold": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "kept_fraction": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
              "label": "kept share"},
}


def jpeg(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def item(key: str, caption: str = "a dog on a beach", url: str = "http://example.com/x.jpg", group=None) -> dict:
    return {"key": key, "caption": caption, "url": url, "clean_prob": 0.123456, "cosine": 0.311111, "group": group}


FACTS = {
    "title": "Noise audit: synthetic",
    "teacher": {"model": "ViT-B-32", "checkpoints": ["ckpt/a.pt", "ckpt/b.pt"], "logit_scale": [4.6052, 4.59], "tau_s": 0.01},
    "noise": {"estimated_rate": 0.2987, "ci_low": 0.281, "ci_high": 0.317, "temperature_indicator": 1.02,
              "noisy_component_weight": 0.31},
    "counts": {"input_rows": 2100, "samples": 2050, "scored": 2000, "failed": 50, "rejected": 30, "download_failures": 20,
               "reconciled": True, "failures_by_reason": [{"stage": "download", "reason": "http_404", "count": 20},
                                                         {"stage": "score", "reason": "decode", "count": 30}]},
    "policies": [{"policy": "clean_prob", "threshold": 0.5, "kept": 1400, "kept_fraction": 0.7},
                 {"policy": "top_k", "threshold": "70%", "kept": 1400, "kept_fraction": 0.7}],
    "sources": [{"source": "web-a", "pairs": 1200, "mean_clean_prob": 0.74, "estimated_noise": 0.25},
                {"source": "web-b", "pairs": 800, "mean_clean_prob": 0.61, "estimated_noise": 0.37}],
    "detection": {"threshold": 0.5, "rows": [{"score": "clean_prob", "auroc": 0.97, "precision": 0.9, "recall": 0.88},
                                             {"score": "cosine", "auroc": 0.91, "precision": 0.8, "recall": 0.79}]},
    "missing_scores": ["shard-00007"],
    "warnings": ["teacher checkpoints disagree on logit_scale"],
}


def galleries_and_thumbs() -> tuple[dict, dict]:
    galleries = {
        "mismatches": [item("m0", caption=EVIL_CAPTION, url=EVIL_URL), item("m1"), item("m2-nothumb")],
        "borderline": [item(f"b{i}") for i in range(3)],
        "cleanest": [item(f"c{i}", caption="a red bus in a street") for i in range(3)],
        "duplicate_images": [item("d0", group="g1"), item("d1", caption="another caption", group="g1"),
                             item("d2", group="g2"), item("d3", group="g2"), item("d4", group="g2")],
        "duplicate_captions": [item("e0", group="7"), item("e1", group="7")],
    }
    keys = [it["key"] for items in galleries.values() for it in items if it["key"] != "m2-nothumb"]
    rng = np.random.default_rng(1)
    thumbs = {k: jpeg(tuple(int(c) for c in rng.integers(40, 220, 3))) for k in keys}
    return galleries, thumbs


@pytest.fixture(scope="module")
def figures() -> dict[str, bytes]:
    figs = histograms(synthetic_table(), MIXTURE)
    figs["policies"] = policy_curves(CURVES)
    figs["extra_thing"] = figs["cosine"]  # an unknown name goes under "Other figures"
    return figs


@pytest.fixture(scope="module")
def page(figures) -> str:
    galleries, thumbs = galleries_and_thumbs()
    return render_page(FACTS, figures, galleries, thumbs)


class Tags(HTMLParser):
    """Every start tag with its attributes: attributes, not text, are what a browser fetches or runs."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def of(self, name: str) -> list[dict]:
        return [a for t, a in self.tags if t == name]


def png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    img.verify()
    assert img.format == "PNG"
    return img.size


def test_figures_are_pngs(figures):
    assert set(figures) >= {"cosine", "dn_score", "loss", "clean_prob", "policies"}
    for name in ("cosine", "dn_score", "loss", "clean_prob"):
        assert png_size(figures[name]) == (500, 320), name
    w, h = png_size(figures["policies"])
    assert h == 320 and w > 3 * 250  # a subplot per policy, side by side
    assert png_size(policy_curves({"one": CURVES["cosine"]}))[0] < w


def test_loss_figure_draws_the_mixture(figures):
    table = synthetic_table()
    without = histograms(table, None)["loss"]
    assert figures["loss"] != without
    # The mixture only touches the loss figure.
    assert histograms(table, MIXTURE)["dn_score"] == histograms(table, None)["dn_score"]


def test_histograms_without_truth_or_rows():
    table = synthetic_table(300).drop("noisy")
    assert png_size(histograms(table, MIXTURE)["cosine"]) == (500, 320)
    empty = table.clear()
    assert all(png_size(b) == (500, 320) for b in histograms(empty, None).values())


def test_figure_files(figures):
    files = figure_files(figures)
    assert files["loss.png"] == figures["loss"] and len(files) == len(figures)


def test_untrusted_text_is_escaped(page):
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page or "&quot;&gt;&lt;img src=x onerror" in page
    tags = Tags(page)
    assert tags.of("script") == []
    assert not any("onerror" in a for _, a in tags.tags)
    assert not any(a.get("src") == "x" for a in tags.of("img"))


def test_page_is_self_contained(page, figures):
    tags = Tags(page)
    for tag, attrs in tags.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert "//" not in value[:12], (tag, name, value[:80])  # no http://, https:// or //host
    assert tags.of("link") == [] and "@import" not in page and "url(" not in page
    imgs = tags.of("img")
    assert imgs and all(a.get("src", "").startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for a in imgs)
    galleries, thumbs = galleries_and_thumbs()
    shown_thumbs = sum(it["key"] in thumbs for items in galleries.values() for it in items)
    assert len(imgs) == len(figures) + shown_thumbs
    assert "Other figures" in page
    assert "29.9%" in page and "[28.1%, 31.7%]" in page  # rate as percent, CI as [a, b]


def test_missing_thumbnail_and_warnings(page):
    tags = Tags(page)
    assert not any(not a.get("src") for a in tags.of("img"))
    placeholders = [a for _, a in tags.tags if "placeholder" in (a.get("class") or "")]
    assert len(placeholders) == 1  # m2-nothumb
    assert "shard-00007" in page and "have no scores" in page
    assert "teacher checkpoints disagree on logit_scale" in page
    # Duplicate galleries: one cluster per group (g1, g2, and 7), each under its own heading.
    assert len([a for _, a in tags.tags if a.get("class") == "cluster"]) == 3
    assert "group g2" in page and "(3 pairs)" in page


def test_absent_sections_are_skipped():
    page = render_page({"title": "bare"}, {}, {"mismatches": []}, {})
    assert "<title>bare</title>" in page
    for heading in ("Teacher", "Counts", "Policies", "Sources", "Detection", "Figures", "Most likely mismatches"):
        assert f">{heading}" not in page
    assert Tags(page).of("img") == [] and "warning\"" not in page
    assert render_page({}, {}, {}, {}).count("<h1>Noise audit</h1>") == 1


@pytest.mark.slow
def test_page_in_headless_chromium(page, figures, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` to install Debian's chromium")
    from playwright.sync_api import sync_playwright

    html = tmp_path / "audit.html"
    html.write_text(page, encoding="utf-8")
    shot = tmp_path / "audit.png"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(html.as_uri(), wait_until="load")
            widths = tab.evaluate("Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    galleries, thumbs = galleries_and_thumbs()
    shown_thumbs = sum(it["key"] in thumbs for items in galleries.values() for it in items)
    assert len(widths) == len(figures) + shown_thumbs
    assert all(w > 0 for w in widths), widths
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing went to the network
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
