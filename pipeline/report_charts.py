"""The report's charts (pipeline.report): matplotlib figures rendered to SVG data URIs.

Each function takes plain rows or arrays and returns a `data:image/svg+xml;base64,...` string
for an <img> tag: the page stays one self-contained file (no CDN, no JavaScript charts), and
an image per chart keeps the SVG element ids of one figure from clashing with another's.
Figures are built with the object API (no pyplot state), text is drawn as paths (no font
needed where the report is opened) and the SVG carries no date, so the same run gives the
same bytes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # never a GUI backend, even where a display is set

from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

POOLED = "single styles"  # pipeline.commands.SINGLE_STYLES (not imported: no catalog here)
STYLE = {"font.size": 9, "axes.titlesize": 10, "svg.hashsalt": "fsr-pipe",
         "axes.spines.top": False, "axes.spines.right": False}


def to_data_uri(figure: Figure) -> str:
    """The figure as an SVG data URI."""
    buffer = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(STYLE):
        return Figure(figsize=(width, height), layout="constrained")


def recall_bars(rows: Sequence[dict], methods: Sequence[tuple[str, str]], title: str) -> str:
    """Grouped bars: Recall@K of each method (name, label) per query set, a panel per K.
    rows: retrieval_metrics rows (style, fusion, k, method, value) of one protocol."""
    sets = sorted({(r["style"], r["fusion"]) for r in rows},
                  key=lambda s: (s[1] != "none", s))
    ks = sorted({r["k"] for r in rows})
    value = {(r["style"], r["fusion"], r["k"], r["method"]): r["value"] for r in rows}
    with matplotlib.rc_context(STYLE):
        fig = _figure(10.5, 1.7 * len(ks) + 0.6)
        axes = fig.subplots(len(ks), 1, squeeze=False, sharex=True)[:, 0]
        width = 0.8 / max(1, len(methods))
        for ax, k in zip(axes, ks):
            for i, (name, label) in enumerate(methods):
                heights = [value.get((s, f, k, name), 0.0) or 0.0 for s, f in sets]
                ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(sets))],
                       heights, width, label=label)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(f"R@{k}")
            ax.grid(axis="y", alpha=0.3)
        axes[-1].set_xticks(range(len(sets)), [s if f == "none" else f"{s} ({f})"
                                               for s, f in sets], rotation=25, ha="right")
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        axes[0].set_title(title)
        return to_data_uri(fig)


def paired_bars(rows: Sequence[dict], labels: dict[str, str], title: str) -> str:
    """A panel per other method, a line per query set: wins (queries only the first method
    finds) to the right, losses to the left. rows: paired_table rows of one protocol and K."""
    # Single styles first, their pooled line ("single styles") last of them, then the pairs.
    sets = sorted({(r["style"], r["fusion"]) for r in rows},
                  key=lambda s: (s[1] != "none", s[0] == POOLED, s))
    versus = sorted({r["versus"] for r in rows})
    by = {(r["style"], r["fusion"], r["versus"]): r for r in rows}
    reach = max([1, *(max(r["wins"], r["losses"]) for r in rows)]) * 1.15
    with matplotlib.rc_context(STYLE):
        fig = _figure(3.2 * len(versus) + 1.8, 0.28 * len(sets) + 1.2)
        axes = fig.subplots(1, len(versus), squeeze=False, sharey=True)[0]
        for ax, name in zip(axes, versus):
            got = [by.get((s, f, name)) for s, f in sets]
            ax.barh(range(len(sets)), [r["wins"] if r else 0 for r in got], 0.7,
                    color="#1a9641", label="wins")
            ax.barh(range(len(sets)), [-r["losses"] if r else 0 for r in got], 0.7,
                    color="#d7191c", label="losses")
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xlim(-reach, reach)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set(title=f"vs {labels.get(name, name)}", xlabel="losses | wins (queries)")
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(sets)),
                           [s if f == "none" else f"{s} ({f})" for s, f in sets])
        axes[0].invert_yaxis()
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        fig.suptitle(title)
        return to_data_uri(fig)


def training_curves(rows: Sequence[dict], labels: dict[str, str]) -> str:
    """Loss and validation R@1 per epoch, a line per trained method (train_history rows)."""
    methods = sorted({r["method"] for r in rows})
    with matplotlib.rc_context(STYLE):
        fig = _figure(8.0, 3.0)
        loss_ax, recall_ax = fig.subplots(1, 2)
        for name in methods:
            mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["epoch"])
            losses = [(r["epoch"], r["loss"]) for r in mine if r["loss"] is not None]
            label = labels.get(name, name)
            loss_ax.plot([e for e, _ in losses], [v for _, v in losses], "o-", label=label)
            recall_ax.plot([r["epoch"] for r in mine], [r["val_recall_at_1"] for r in mine],
                           "o-", label=label)
        loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
        recall_ax.set(title="validation R@1 (epoch 0: untrained prompts)", xlabel="epoch",
                      ylabel="R@1", ylim=(0, 1.05))
        for ax in (loss_ax, recall_ax):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        recall_ax.legend(frameon=False)
        return to_data_uri(fig)


def style_space(xy: Sequence[Sequence[float]], styles: Sequence[str],
                clusters: Sequence[int]) -> str:
    """Two scatter panels of the same 2-D projection: coloured by true style, by cluster."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(9.0, 3.8)
        for ax, values, title in zip(fig.subplots(1, 2), (styles, clusters),
                                     ("true query style", "style cluster")):
            for i, value in enumerate(sorted(set(values))):
                points = [p for p, v in zip(xy, values) if v == value]
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=10,
                           color=f"C{i % 10}", label=str(value), alpha=0.8)
            ax.set(title=f"Gram vectors, PCA 2-D: {title}", xlabel="PC 1", ylabel="PC 2")
            ax.legend(fontsize=8, frameon=False, markerscale=1.5)
        return to_data_uri(fig)


def index_recall(rows: Sequence[dict], labels: dict[str, str], knob: str = "nprobe") -> str:
    """10-recall@10 against exact search vs a search knob (`nprobe` for IVF, `ef_search` for
    HNSW), a line per method and re-ranking depth (index_recall rows with knob > 0)."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(6.5, 3.0)
        ax = fig.subplots()
        for method, rerank in sorted({(r["method"], r["rerank_k"]) for r in rows}):
            mine = sorted((r for r in rows if (r["method"], r["rerank_k"]) == (method, rerank)),
                          key=lambda r: r[knob])
            suffix = f", re-rank {rerank}" if rerank else ""
            ax.plot([r[knob] for r in mine], [r["recall_10_at_10"] for r in mine], "o-",
                    label=f"{labels.get(method, method)}{suffix}")
        chosen = [r for r in rows if r.get("chosen")]
        if chosen:  # the setting the index stage tuned and score searched with
            ax.scatter([r[knob] for r in chosen], [r["recall_10_at_10"] for r in chosen], s=160,
                       facecolors="none", edgecolors="black", label="chosen", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r[knob] for r in rows}))  # the values measured, as numbers
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set(title=f"index recall vs {knob}", xlabel=knob, ylabel="10-recall@10",
               ylim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        return to_data_uri(fig)
