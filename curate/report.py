"""The noise-audit report: matplotlib figures as PNG bytes and one self-contained HTML page.

Plain functions that take data and return data; the audit pipeline writes what they return.
The page opens from disk with no server and no network: every image is inlined as a data: URI,
the CSS is inline, there is no JavaScript, and sample urls are shown as text, never fetched.
Captions and urls are untrusted web text, so the template autoescapes everything.
"""

from __future__ import annotations

import base64
import io
import math

import jinja2
import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HIST_COLUMNS = ("cosine", "dn_score", "loss", "clean_prob")
FIGSIZE = (5.0, 3.2)
DPI = 100
BINS = 50
CLEAN_COLOR, NOISY_COLOR = "#4c72b0", "#dd8452"

TITLES = {
    "cosine": "Cosine similarity (CLIP score)",
    "dn_score": "Distribution-normalised score",
    "loss": "Per-pair loss",
    "clean_prob": "Posterior probability of clean",
}
CAPTIONS = {
    "cosine": "Raw image-text cosine of the teacher: the baseline score (DataComp's CLIP-score filter).",
    "dn_score": "Cosine after distribution normalisation (the batch mean embedding removed).",
    "loss": "Per-pair contrastive loss with the two-component Gaussian mixture fitted to it "
            "(component 0 = clean, 1 = noisy).",
    "clean_prob": "Each pair's posterior probability of being clean under the mixture.",
    "policies": "Fraction of pairs each policy keeps as its threshold moves.",
}
GALLERY_TITLES = {
    "mismatches": "Most likely mismatches",
    "borderline": "Borderline pairs",
    "cleanest": "Cleanest pairs",
    "duplicate_images": "Duplicate images (same image, different captions)",
    "duplicate_captions": "Duplicate captions (same caption, different images)",
}
GROUPED_GALLERIES = ("duplicate_images", "duplicate_captions")


# ---- figures -------------------------------------------------------------------------------------

def figure(width: float = FIGSIZE[0], height: float = FIGSIZE[1]) -> Figure:
    """A bare Figure on the Agg canvas: no pyplot global state, safe from any thread or worker."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at the report's DPI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": keep the pixel size fixed
    return buf.getvalue()


def _values(table: pl.DataFrame, column: str, mask: pl.Expr | None = None) -> np.ndarray:
    """The finite values of one column (nulls and NaNs dropped), optionally where mask holds."""
    if column not in table.columns:
        return np.empty(0)
    frame = table if mask is None else table.filter(mask)
    x = frame[column].drop_nulls().to_numpy().astype(np.float64)
    return x[np.isfinite(x)]


def _bins(x: np.ndarray, column: str) -> np.ndarray:
    if column == "clean_prob":
        return np.linspace(0.0, 1.0, BINS + 1)  # a probability: always the full range
    lo, hi = (float(x.min()), float(x.max())) if len(x) else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, BINS + 1)


def _normal_pdf(x: np.ndarray, mean: float, variance: float) -> np.ndarray:
    return np.exp(-0.5 * (x - mean) ** 2 / variance) / math.sqrt(2 * math.pi * variance)


def _draw_mixture(ax, bins: np.ndarray, mixture: dict) -> None:
    """Each weighted component and their sum, on the histogram's density scale."""
    means, variances, weights = mixture["means"], mixture["variances"], mixture["weights"]
    # Span the components too, so a component sitting outside the data still shows its shape.
    spread = [math.sqrt(v) for v in variances]
    lo = min([bins[0]] + [m - 3 * s for m, s in zip(means, spread)])
    hi = max([bins[-1]] + [m + 3 * s for m, s in zip(means, spread)])
    grid = np.linspace(lo, hi, 400)
    parts = [w * _normal_pdf(grid, m, v) for w, m, v in zip(weights, means, variances)]
    # The sum goes underneath, wide and faint: where one component is ~0 the lines coincide.
    ax.plot(grid, sum(parts), color="black", lw=3.0, alpha=0.35, label="mixture (sum)")
    for k, (part, name, color) in enumerate(zip(parts, ("clean", "noisy"), (CLEAN_COLOR, NOISY_COLOR))):
        ax.plot(grid, part, color=color, lw=1.5, label=f"{name} component (w={weights[k]:.2f})")


def _histogram(table: pl.DataFrame, column: str, mixture: dict | None) -> bytes:
    fig = figure()
    ax = fig.add_subplot()
    x = _values(table, column)
    bins = _bins(x, column)
    by_truth = column in ("cosine", "clean_prob") and "noisy" in table.columns
    if not len(x):
        ax.text(0.5, 0.5, "no scored rows", ha="center", va="center", transform=ax.transAxes)
    elif by_truth:
        # The demo world knows which pairs are noisy: stack them so the separation is visible.
        clean = _values(table, column, pl.col("noisy").eq(False))
        noisy = _values(table, column, pl.col("noisy").eq(True))
        ax.hist([clean, noisy], bins=bins, stacked=True, color=[CLEAN_COLOR, NOISY_COLOR],
                label=[f"clean (n={len(clean):,})", f"noisy (n={len(noisy):,})"])
        ax.legend(fontsize=8)
    else:
        density = column == "loss" and mixture is not None
        ax.hist(x, bins=bins, density=density, color="#c4c4c4" if density else CLEAN_COLOR,
                label=f"pairs (n={len(x):,})")
        if density:
            _draw_mixture(ax, bins, mixture)
            ax.legend(fontsize=7)
    ax.set_title(TITLES[column], fontsize=10)
    ax.set_xlabel(column)
    ax.set_ylabel("density" if column == "loss" and mixture is not None else "pairs")
    return png(fig)


def histograms(table: pl.DataFrame, mixture: dict | None) -> dict[str, bytes]:
    """PNG bytes of a histogram per score column; the loss one carries the fitted mixture."""
    return {column: _histogram(table, column, mixture) for column in HIST_COLUMNS}


def policy_curves(curves: dict[str, dict]) -> bytes:
    """One PNG: kept fraction against threshold, one subplot per policy (their x ranges differ)."""
    n = max(len(curves), 1)
    fig = figure(width=1.0 + 3.0 * n)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    if not curves:
        axes[0].text(0.5, 0.5, "no policies", ha="center", va="center", transform=axes[0].transAxes)
    for ax, (name, curve) in zip(axes, curves.items()):
        ax.plot(curve["threshold"], curve["kept_fraction"], color=CLEAN_COLOR, lw=1.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(curve.get("label") or "threshold", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0.0, 1.0)
    axes[0].set_ylabel("kept fraction")
    return png(fig)


def figure_files(figures: dict[str, bytes]) -> dict[str, bytes]:
    """Filename -> bytes, for writing the PNGs beside the page."""
    return {f"{name}.png": data for name, data in figures.items()}


# ---- page ----------------------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if _is_number(x) else "—"


def _num(x, digits: int = 3) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if _is_number(x):
        return f"{x:.{digits}f}"
    return "—" if x is None or isinstance(x, jinja2.Undefined) else str(x)


def _ci(low, high) -> str:
    return f"[{_pct(low)}, {_pct(high)}]"


def _data_uri(data: bytes) -> str:
    # Sniff rather than trust the name: thumbnails are JPEG, figures PNG, but either may turn up.
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _card(item: dict, thumbs: dict[str, bytes]) -> dict:
    data = thumbs.get(item.get("key"))
    return {**item, "src": _data_uri(data) if data else None}


def _gallery(name: str, items: list[dict], thumbs: dict[str, bytes]) -> dict:
    """One gallery as the template walks it: a list of clusters (a single untitled one if ungrouped)."""
    cards = [_card(item, thumbs) for item in items]
    if name not in GROUPED_GALLERIES:
        return {"name": name, "title": GALLERY_TITLES.get(name, name), "clusters": [{"group": None, "cards": cards}]}
    clusters: dict = {}  # insertion order: clusters appear as the pipeline ranked them
    for card in cards:
        clusters.setdefault(card.get("group"), []).append(card)
    return {"name": name, "title": GALLERY_TITLES[name],
            "clusters": [{"group": g, "cards": c} for g, c in clusters.items()]}


def _figure_list(figures: dict[str, bytes]) -> tuple[list[dict], list[dict]]:
    known = [*HIST_COLUMNS, "policies"]
    main = [{"name": n, "caption": CAPTIONS[n], "src": _data_uri(figures[n])} for n in known if n in figures]
    other = [{"name": n, "caption": n, "src": _data_uri(b)} for n, b in figures.items() if n not in known]
    return main, other


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d232a; background: #f6f7f9; margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d5d9de; }
h3 { font-size: 14px; margin: 16px 0 6px; color: #444; }
.sub { color: #5b6470; margin: 0 0 16px; }
.warning { background: #fff4e0; border: 1px solid #f0b454; border-left: 5px solid #e08a00;
           padding: 8px 12px; margin: 8px 0; border-radius: 4px; }
.headline { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.stat { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 10px 14px; min-width: 150px; }
.stat .v { font-size: 22px; font-weight: 600; }
.stat .k { color: #5b6470; font-size: 12px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 10px; }
th, td { border: 1px solid #dde1e6; padding: 4px 10px; text-align: left; }
th { background: #eef0f3; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b3261e; font-weight: 600; }
.good { color: #1e7a34; font-weight: 600; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 8px; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { color: #5b6470; font-size: 12px; max-width: 500px; margin-top: 4px; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.cluster { background: #eef0f3; border-radius: 6px; padding: 6px 8px 8px; margin: 8px 0; }
.card { width: 168px; background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 6px;
        font-size: 12px; overflow-wrap: anywhere; }
.thumb { display: block; width: 168px; height: 168px; object-fit: cover; border-radius: 4px; }
.placeholder { width: 168px; height: 168px; background: #c8ccd1; color: #5b6470; border-radius: 4px;
               display: flex; align-items: center; justify-content: center; font-size: 12px; }
.caption { margin: 4px 0 2px; }
.url { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 10px; color: #5b6470; }
.scores { color: #333; margin-top: 2px; font-variant-numeric: tabular-nums; }
.scores span { white-space: nowrap; margin-right: 6px; }
ul.plain { margin: 4px 0; padding-left: 18px; }
</style>
</head>
<body>
<main>
<h1>{{ title }}</h1>
<p class="sub">Noise audit of the scored pairs.</p>

{% if missing_scores %}
<div class="warning"><strong>{{ missing_scores|length }} shard(s) have no scores</strong>; the figures and counts
leave them out: {{ missing_scores|join(", ") }}</div>
{% endif %}
{% for w in warnings %}<div class="warning">{{ w }}</div>
{% endfor %}

{% if noise %}
<h2>Noise estimate</h2>
<div class="headline">
  <div class="stat"><div class="v">{{ noise.estimated_rate|pct }}</div><div class="k">estimated noise rate</div></div>
  <div class="stat"><div class="v">{{ ci(noise.ci_low, noise.ci_high) }}</div><div class="k">confidence interval</div></div>
  {% if noise.noisy_component_weight is defined %}
  <div class="stat"><div class="v">{{ noise.noisy_component_weight|pct }}</div><div class="k">noisy mixture weight</div></div>
  {% endif %}
  {% if noise.temperature_indicator is defined %}
  <div class="stat"><div class="v">{{ noise.temperature_indicator|num }}</div><div class="k">temperature indicator</div></div>
  {% endif %}
</div>
{% endif %}

{% if teacher %}
<h2>Teacher</h2>
<table>
  <tr><th>model</th><td>{{ teacher.model|num }}</td></tr>
  {% if teacher.checkpoints %}<tr><th>checkpoints</th><td><ul class="plain">
    {% for c in teacher.checkpoints %}<li>{{ c }}</li>{% endfor %}</ul></td></tr>{% endif %}
  {% if teacher.logit_scale %}<tr><th>logit scale</th><td>
    {% for s in teacher.logit_scale %}{{ s|num }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>{% endif %}
  {% if teacher.tau_s is defined %}<tr><th>&tau;<sub>s</sub></th><td>{{ teacher.tau_s|num(4) }}</td></tr>{% endif %}
</table>
{% endif %}

{% if counts %}
<h2>Counts</h2>
<table>
  {% for k in count_keys if counts[k] is defined %}
  <tr><th>{{ k|replace("_", " ") }}</th><td class="n">{{ counts[k]|num }}</td></tr>
  {% endfor %}
  {% if counts.reconciled is defined %}
  <tr><th>reconciled</th><td class="{{ 'good' if counts.reconciled else 'bad' }}">
    {{ "yes" if counts.reconciled else "NO: the counts do not add up" }}</td></tr>
  {% endif %}
</table>
{% if counts.failures_by_reason %}
<h3>Failures by reason</h3>
<table>
  <tr><th>stage</th><th>reason</th><th>count</th></tr>
  {% for f in counts.failures_by_reason %}
  <tr><td>{{ f.stage }}</td><td>{{ f.reason }}</td><td class="n">{{ f.count|num }}</td></tr>
  {% endfor %}
</table>
{% endif %}
{% endif %}

{% if policies %}
<h2>Policies</h2>
<table>
  <tr><th>policy</th><th>threshold</th><th>kept</th><th>kept fraction</th></tr>
  {% for p in policies %}
  <tr><td>{{ p.policy }}</td><td class="n">{{ p.threshold|num }}</td><td class="n">{{ p.kept|num }}</td>
      <td class="n">{{ p.kept_fraction|pct }}</td></tr>
  {% endfor %}
</table>
{% endif %}

{% if sources %}
<h2>Sources</h2>
<table>
  <tr><th>source</th><th>pairs</th><th>mean clean prob</th><th>estimated noise</th></tr>
  {% for s in sources %}
  <tr><td>{{ s.source }}</td><td class="n">{{ s.pairs|num }}</td><td class="n">{{ s.mean_clean_prob|num }}</td>
      <td class="n">{{ s.estimated_noise|pct }}</td></tr>
  {% endfor %}
</table>
{% endif %}

{% if detection %}
<h2>Detection against ground truth</h2>
<p class="sub">Demo world only: how well each score finds the known noisy pairs
{%- if detection.threshold is defined %} (precision and recall at threshold {{ detection.threshold|num }}){% endif %}.</p>
<table>
  <tr><th>score</th><th>AUROC</th><th>precision</th><th>recall</th></tr>
  {% for r in detection.rows %}
  <tr><td>{{ r.score }}</td><td class="n">{{ r.auroc|num }}</td><td class="n">{{ r.precision|num }}</td>
      <td class="n">{{ r.recall|num }}</td></tr>
  {% endfor %}
</table>
{% endif %}

{% if figures %}
<h2>Figures</h2>
<div class="figs">
{% for f in figures %}
  <figure><img src="{{ f.src }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
</div>
{% endif %}
{% if other_figures %}
<h2>Other figures</h2>
<div class="figs">
{% for f in other_figures %}
  <figure><img src="{{ f.src }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
</div>
{% endif %}

{% for g in galleries %}
<h2>{{ g.title }}</h2>
{% for cl in g.clusters %}
{% if cl.group is not none %}<div class="cluster"><h3>{{ g.name|replace("_", " ") }} group {{ cl.group }}
  ({{ cl.cards|length }} pairs)</h3>{% endif %}
<div class="gallery">
{% for c in cl.cards %}
  <div class="card">
    {% if c.src %}<img class="thumb" src="{{ c.src }}" alt="{{ c.key }}">
    {% else %}<div class="placeholder">no thumbnail</div>{% endif %}
    <div class="caption">{{ c.caption }}</div>
    <div class="url">{{ c.url }}</div>
    <div class="scores"><span>clean_prob {{ c.clean_prob|num }}</span> <span>cosine {{ c.cosine|num }}</span></div>
  </div>
{% endfor %}
</div>
{% if cl.group is not none %}</div>{% endif %}
{% endfor %}
{% endfor %}
</main>
</body>
</html>
"""

COUNT_KEYS = ("input_rows", "samples", "scored", "failed", "rejected", "download_failures")


def _environment() -> jinja2.Environment:
    # autoescape on for every template: captions and urls are untrusted web text.
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=_pct, num=_num)
    env.globals.update(ci=_ci)
    return env


def render_page(facts: dict, figures: dict[str, bytes], galleries: dict[str, list[dict]],
                thumbs: dict[str, bytes]) -> str:
    """The whole self-contained HTML page of the audit."""
    main_figures, other_figures = _figure_list(figures)
    known = [n for n in GALLERY_TITLES if galleries.get(n)]
    unknown = [n for n in galleries if n not in GALLERY_TITLES and galleries[n]]
    return _environment().from_string(TEMPLATE).render(
        title=facts.get("title") or "Noise audit",
        teacher=facts.get("teacher"),
        noise=facts.get("noise"),
        counts=facts.get("counts"),
        count_keys=COUNT_KEYS,
        policies=facts.get("policies"),
        sources=facts.get("sources"),
        detection=facts.get("detection"),
        missing_scores=facts.get("missing_scores") or [],
        warnings=facts.get("warnings") or [],
        figures=main_figures,
        other_figures=other_figures,
        galleries=[_gallery(n, galleries[n], thumbs) for n in known + unknown],
    )
