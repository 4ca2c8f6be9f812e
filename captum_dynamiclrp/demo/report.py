"""Pictures and HTML: heatmap grids drawn with Captum's visualisation, token heatmaps, the demo report."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import DemoError
from .labels import short_label


@dataclass
class MethodResult:
    """One attribution method on one input.

    Attributes:
        name: Method name as shown ("DynamicLRP", "IntegratedGradients", ...).
        attribution: Same shape as the input (``1 x 3 x H x W`` for images).
        seconds: Wall time of the ``attribute`` call.
        delta: Convergence / conservation delta where the method defines one.
        detail: Settings shown beside the name ("n_steps=16").
    """

    name: str
    attribution: Tensor
    seconds: float
    delta: Optional[float] = None
    detail: str = ""

    @property
    def total(self) -> float:
        return float(self.attribution.sum())


@dataclass
class ImageExplanation:
    """Everything drawn and reported for one image."""

    title: str
    image: np.ndarray  # the H x W x 3 uint8 crop the model saw
    top: list[tuple[int, str, float]]  # (class index, class name, probability), best first
    target: int
    target_name: str
    target_score: float
    methods: list[MethodResult] = field(default_factory=list)
    picture: Optional[Path] = None


def to_hwc(attribution: Tensor) -> np.ndarray:
    """``1 x C x H x W`` (or ``C x H x W``) tensor -> ``H x W x C`` float numpy, what Captum's visualiser wants."""
    array = attribution.detach().float().cpu()
    if array.dim() == 4:
        array = array[0]
    return array.permute(1, 2, 0).numpy()


def draw_heatmap(ax: Any, fig: Any, attribution: Tensor, title: str) -> None:
    """Signed heatmap (red positive, blue negative) through ``captum.attr.visualization.visualize_image_attr``."""
    from captum.attr import visualization as viz

    values = to_hwc(attribution)
    if not np.any(values):
        values = values + 1e-12  # Captum's normaliser divides by the largest value
    viz.visualize_image_attr(
        values,
        method="heat_map",
        sign="all",
        cmap="bwr",
        outlier_perc=1,
        plt_fig_axis=(fig, ax),
        use_pyplot=False,
        title=title,
    )


def save_image_grid(explanation: ImageExplanation, path: Path, dpi: int = 100) -> Path:
    """One row: the photo, its top-5 classes, then one heatmap per method. Returns ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DemoError("the pictures need matplotlib: pip install matplotlib", 1) from None

    columns = 2 + len(explanation.methods)
    fig = Figure(figsize=(2.55 * columns, 3.45), dpi=dpi)
    axes = fig.subplots(1, columns)
    axes[0].imshow(explanation.image)
    axes[0].set_title(explanation.title, fontsize=10)
    axes[0].axis("off")
    bar_ax = axes[1]
    rows = explanation.top[::-1]
    colors = ["#d62728" if idx == explanation.target else "#9e9e9e" for idx, _, _ in rows]
    bar_ax.barh(range(len(rows)), [p for _, _, p in rows], color=colors, height=0.8)
    for y, (_, name, p) in enumerate(rows):
        bar_ax.text(0.02, y, f"{short_label(name)[:24]}  {100 * p:.0f}%", va="center", fontsize=8)
    bar_ax.set_xlim(0, 1)
    bar_ax.set_ylim(-0.6, len(rows) - 0.4)
    bar_ax.set_yticks([])
    bar_ax.set_xticks([0, 0.5, 1])
    bar_ax.tick_params(axis="x", labelsize=7)
    bar_ax.set_title("top-5 classes", fontsize=10)
    bar_ax.set_box_aspect(1)
    for ax, method in zip(axes[2:], explanation.methods):
        label = f"{method.name}\n{method.seconds:.2f} s"
        if method.delta is not None:
            label += f", delta {method.delta:+.3g}"
        draw_heatmap(ax, fig, method.attribution, label)
        ax.title.set_fontsize(9)
    fig.suptitle(
        f"explained class: {short_label(explanation.target_name)} (logit {explanation.target_score:.2f})   "
        "red = evidence for, blue = against",
        fontsize=10,
    )
    fig.tight_layout(w_pad=0.6, rect=(0, 0, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# --------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.covered { color: #1a7f37; } .uncovered, .fallback { color: #c62828; font-weight: bold; }
img.grid { max-width: 100%; border: 1px solid #ddd; }
.tokens span { padding: 2px 1px; margin: 1px 0; border-radius: 3px; line-height: 2.1; white-space: pre-wrap; }
.note { color: #555; font-size: 0.92em; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def coverage_table(report: Any) -> str:
    """A :class:`~captum_dynamiclrp.CoverageReport` as an HTML table with its summary line."""
    data = report.to_dict()
    rows = []
    for op in data["ops"]:
        modules = ", ".join(op.get("modules") or [])
        rows.append(
            f"<tr><td>{html.escape(op['op'])}</td><td class='num'>{op['count']}</td>"
            f"<td class='{op['status']}'>{op['status']}</td><td>{html.escape(op['rule'])}"
            f"{' (made by ' + html.escape(modules) + ')' if modules else ''}</td></tr>"
        )
    summary = (
        f"<p><b>op coverage: {data['covered_nodes']}/{data['total_nodes']} autograd nodes covered by a real rule "
        f"({100 * data['fraction']:.2f}%)</b></p>"
    )
    return (
        summary
        + "<table><tr><th>autograd op</th><th>count</th><th>status</th><th>rule</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def methods_table(explanation: ImageExplanation) -> str:
    """Time, sum of attributions, delta and agreement with the first method (DynamicLRP) for each method."""
    base = explanation.methods[0] if explanation.methods else None
    reference = base.name if base is not None else ""
    rows = []
    for method in explanation.methods:
        similarity = ""
        if base is not None:
            a, b = method.attribution.flatten().float(), base.attribution.flatten().float()
            similarity = f"{float(torch.nn.functional.cosine_similarity(a, b, dim=0)):.3f}"
        delta = "&mdash;" if method.delta is None else f"{method.delta:+.4g}"
        rows.append(
            f"<tr><td>{method.name}</td><td>{html.escape(method.detail)}</td>"
            f"<td class='num'>{method.seconds:.3f}</td><td class='num'>{method.total:.4g}</td>"
            f"<td class='num'>{delta}</td><td class='num'>{similarity}</td></tr>"
        )
    return (
        "<table><tr><th>method</th><th>settings</th><th>time (s)</th><th>sum of attributions</th>"
        f"<th>delta</th><th>cosine to {reference}</th></tr>" + "".join(rows) + "</table>"
    )


def write_image_report(
    path: Path,
    title: str,
    explanations: Sequence[ImageExplanation],
    meta: dict[str, str],
    coverage: Any = None,
    notes: Sequence[str] = (),
) -> Path:
    """The HTML report: settings, then per image its picture and method table, then the op coverage."""
    parts = [f"<h1>{html.escape(title)}</h1>", "<table>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()]
    parts.append("</table>")
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    for item in explanations:
        top = ", ".join(f"{short_label(name)} {100 * p:.1f}%" for _, name, p in item.top)
        parts.append(f"<h2>{html.escape(item.title)}</h2>")
        parts.append(
            f"<p>top-5: {html.escape(top)}<br>explained: <b>{html.escape(item.target_name)}</b> "
            f"(class {item.target}, logit {item.target_score:.3f})</p>"
        )
        if item.picture is not None:
            parts.append(f"<img class='grid' src='{html.escape(item.picture.name)}' alt='{html.escape(item.title)}'>")
        parts.append(methods_table(item))
    parts.append(
        "<p class='note'>delta: for DynamicLRP the conservation delta, sum(attributions) minus the explained "
        "logit (the relevance absorbed by biases and batch-norm shifts); for IntegratedGradients and GradientShap "
        "Captum's convergence delta (completeness error against the baseline); InputXGradient has none.</p>"
    )
    if coverage is not None:
        parts.append("<h2>Op coverage of the model</h2>")
        parts.append(coverage_table(coverage))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(title, "\n".join(parts)), encoding="utf-8")
    return path


def token_color(score: float) -> str:
    """Background colour of a token: red for positive relevance, blue for negative, white for zero."""
    score = max(-1.0, min(1.0, score))
    if score >= 0:
        return f"rgba(214, 39, 40, {score:.3f})"
    return f"rgba(31, 119, 180, {-score:.3f})"


def token_spans(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens as ``<span>`` elements coloured by relevance (scaled by the largest absolute value)."""
    scale = max([abs(s) for s in scores] + [1e-12])
    spans = []
    for token, score in zip(tokens, scores):
        spans.append(
            f"<span style='background:{token_color(score / scale)}' title='{score:+.4g}'>{html.escape(token)}</span>"
        )
    return "<div class='tokens'>" + "".join(spans) + "</div>"


def write_text_report(
    path: Path,
    title: str,
    tokens: Sequence[str],
    scores: Sequence[float],
    meta: dict[str, str],
    top: int = 10,
    extra_html: str = "",
) -> Path:
    """A token heatmap page: the settings, the coloured text, and the tokens ranked by relevance."""
    parts = [f"<h1>{html.escape(title)}</h1>", "<table>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()]
    parts.append("</table>")
    parts.append("<h2>Token relevance</h2><p class='note'>red: for the target, blue: against; hover for values</p>")
    parts.append(token_spans(tokens, scores))
    ranked = sorted(range(len(tokens)), key=lambda i: -abs(scores[i]))[:top]
    parts.append("<h2>Most relevant tokens</h2><table><tr><th>position</th><th>token</th><th>relevance</th></tr>")
    parts += [
        f"<tr><td class='num'>{i}</td><td>{html.escape(repr(tokens[i]))}</td><td class='num'>{scores[i]:+.4g}</td></tr>"
        for i in ranked
    ]
    parts.append("</table>")
    parts.append(extra_html)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(title, "\n".join(parts)), encoding="utf-8")
    return path
