"""The demo's outputs: `summary.json`, `metrics.jsonl` (all distillation runs), PNG plots and `report.md`.

Plots (matplotlib, Agg backend):
  accuracy.png  general and domain accuracy over distillation steps, one line per method, teachers dashed;
  signals.png   per-step training signals: mean token gap per branch, selected fraction per branch, gradient
                coherence gain (GCG) and the cross-branch gradient dot product <g_g, g_d>.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_camopd.demo.setting import LABELS, DemoSetting, eval_overlap, proxy_label
from megatron_camopd.metrics import read_metrics

BRANCHES = ("general", "domain")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(method: str) -> str:
    """One fixed colour per method across every panel."""
    order = ["camopd", "mopd_1to1", "mopd_3to1", "camopd_no_decouple", "camopd_no_select", "uniopd",
             "relaxed_opd", "selectkd", "exopd"]
    return f"C{order.index(method) % 10}" if method in order else "C9"


def _axes_style(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("distillation step")
    ax.grid(alpha=0.3)


def summary_of(models: dict) -> dict:
    """{"general": {model: acc}, "domain": {model: acc}} from the evaluation results."""
    return {b: {name: float(r[b]["accuracy"]) for name, r in models.items()} for b in BRANCHES}


def plot_accuracy(curves: dict, models: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, b in zip(axes, BRANCHES):
        for m, curve in curves.items():
            ax.plot([st for st, _ in curve], [100 * r[b]["accuracy"] for _, r in curve], marker="o",
                    color=_color(m), label=LABELS.get(m, m))
        for name, style in (("general_teacher", "--"), ("domain_teacher", ":")):
            ax.axhline(100 * models[name][b]["accuracy"], color="grey", linestyle=style,
                       label=name.replace("_", " "))
        ax.set_title(f"{b} accuracy (greedy exact match)")
        ax.set_ylim(-2, 102)
        _axes_style(ax)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Student (initialised from the domain teacher) during on-policy distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_signals(rows_by_method: dict[str, list[dict]], path: Path) -> Path:
    plt = _plt()
    panels = [("mean_gap/{b}", "mean token gap log pT - log ps (nats/token)", True),
              ("selected_fraction/{b}", "selected fraction |S_b| / |B_b|", True),
              ("diag_gcg", "gradient coherence gain GCG (%)", False),
              ("diag_grad_dot", "cross-branch gradient dot <g_g, g_d>", False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title, per_branch) in zip(axes.flat, panels):
        for m, rows in rows_by_method.items():
            for b in (BRANCHES if per_branch else ("",)):
                xs, ys = _series(rows, key.format(b=b))
                if xs:
                    label = LABELS.get(m, m) + (f" / {b}" if b else "")
                    ax.plot(xs, ys, marker="." if b != "domain" else "x", color=_color(m),
                            linestyle="-" if b != "domain" else "--", label=label)
        if key == "diag_grad_dot":
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
        _axes_style(ax)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Training signals per method (from metrics.jsonl; solid: general branch, dashed: domain branch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _story(summary: dict, method: str = "camopd") -> dict:
    g, d = summary["general"], summary["domain"]
    lost = g["general_teacher"] - g["domain_teacher"]
    out = {"general_lost": lost, "domain_drop": None, "recovered_fraction": None}
    if method in g:
        out["recovered_fraction"] = (g[method] - g["domain_teacher"]) / lost if lost > 0 else None
        out["domain_drop"] = d["domain_teacher"] - d[method]
    return out


def report_markdown(s: DemoSetting, summary: dict, models: dict, curves: dict, seconds: dict,
                    overlap: dict | None = None) -> str:
    names = list(models)
    lines = ["# CaMOPD demo: general capability recovery with domain preservation", "",
             ("A tiny Qwen3-architecture model trained from scratch on one CPU. The **general teacher** is SFT-ed on "
             f"{', '.join(s.general_tasks)}; the **domain teacher** is the general teacher specialised by SFT on "
             f"`{s.domain_task}` ({s.sft_domain_steps} steps, lr {s.sft_domain_lr:g}, {100 * s.domain_replay:.0f}% general "
             "replay in its data) and forgets. The student starts "
             "from the domain teacher and is distilled on-policy: general teacher on *proxy* general prompts "
             f"({'; '.join(f'{t}: {proxy_label(s, t)}' for t in s.general_tasks)}: the proxy covers the "
             "general distribution incompletely), domain teacher on domain prompts."), "",
             *(["**Quick mode**: step counts are tiny, so the numbers below only show that the pipeline runs.", ""]
               if s.quick_mode else []),
             "## Accuracy (greedy decoding, exact match, %)", "",
             "| model | general | domain |", "| --- | ---: | ---: |"]
    for n in names:
        lines.append(f"| {LABELS.get(n, n.replace('_', ' '))} | {_pct(summary['general'][n])} | "
                     f"{_pct(summary['domain'][n])} |")
    if overlap:
        seen = "; ".join(f"{t} {k}/{n}" for b in ("general", "domain") for t, (k, n) in overlap.get(b, {}).items())
        lines += ["", ("Evaluation examples are drawn with their own seed. Prompts that also occur in a training or "
                       f"prompt set: {seen} (small task spaces such as 1-digit arithmetic repeat).")]
    lines += ["", "### General accuracy per task (%)", ""]
    tasks = sorted({t for r in models.values() for t in r["general"]["per_task"]})
    lines += ["| model | " + " | ".join(f"{t} ({proxy_label(s, t)})" if t in s.general_tasks else t
                                        for t in tasks) + " |",
              "| --- |" + " ---: |" * len(tasks)]
    for n in names:
        pt = models[n]["general"]["per_task"]
        lines.append(f"| {LABELS.get(n, n.replace('_', ' '))} | " + " | ".join(_pct(pt.get(t)) for t in tasks) + " |")
    lines += ["", "## What it means", ""]
    st = _story(summary)
    lines.append(f"- Specialisation cost the domain teacher {_pct(st['general_lost'])} points of general accuracy "
                 "(general teacher -> domain teacher).")
    for m in curves:
        sm = _story(summary, m)
        moved = "n/a" if sm["domain_drop"] is None else f"{0.0 - 100 * sm['domain_drop']:+.1f}"  # no "-0.0"
        lines.append(f"- {LABELS.get(m, m)} recovered {_pct(sm['recovered_fraction'])}% of that gap; its domain "
                     f"accuracy changed by {moved} points relative to the domain teacher.")
    n_gen = models["general_teacher"]["general"].get("n") or 0
    if n_gen:
        p = summary["general"]["domain_teacher"]
        lines.append(f"- With {n_gen} general evaluation examples one standard error of a general accuracy is about "
                     f"{100 * math.sqrt(p * (1 - p) / n_gen):.1f} points: smaller differences between methods "
                     "are noise.")
    held = "holds" if (st["recovered_fraction"] or 0) >= 0.5 and (st["domain_drop"] or 0) <= 0.02 else "does NOT hold"
    lines += [f"- The target (CaMOPD recovers >= 50% of the lost gap, domain within 2 points) **{held}** in this run.",
              "", "## Training curves", "", "![accuracy over steps](accuracy.png)", "",
              "![training signals](signals.png)", "",
              ("Mean gap: per-token `log pT - log ps` on the student's rollouts (per branch). Selected fraction: "
              "share of rollouts CaMOPD's mass-target gap selection keeps. GCG: gain in within-branch gradient "
              "coherence of the selected subset over the full batch. Gradient dot: `<g_g, g_d>` at the same "
              "parameters (negative = the branches counteract)."), "",
              "## Phases and cost", "", "| phase | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v if v is not None else 'cached'} |" for k, v in seconds.items()]
    lines += ["", ("Every phase's spec is in `specs/`; re-run one with `camopd sft|train specs/NAME.yaml`. "
              "Per-step metrics of the distillation runs are in `metrics.jsonl` (field `run`)."), ""]
    return "\n".join(lines)


def write_report(s: DemoSetting, root: Path, result: dict) -> dict:
    """Write summary.json, metrics.jsonl, the PNGs and report.md; returns the summary."""
    from megatron_camopd.demo.phases import phase_seconds

    models, curves = result["evals"]["models"], result["evals"]["curves"]
    summary = summary_of(models)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    rows_by_method = {m: read_metrics(Path(d) / "metrics.jsonl") for m, d in result["runs"].items()}
    with open(root / "metrics.jsonl", "w") as f:
        for m, rows in rows_by_method.items():
            f.writelines(json.dumps({"run": m, **r}) + "\n" for r in rows)
    plot_accuracy(curves, models, root / "accuracy.png")
    plot_signals(rows_by_method, root / "signals.png")
    names = ["general_teacher", "domain_teacher"] + [f"distill_{m}" for m in result["runs"]]
    seconds = {n: phase_seconds(root, n) for n in names}
    overlap = eval_overlap({k: Path(v) for k, v in result["data"].items()}) if result.get("data") else None
    (root / "report.md").write_text(report_markdown(s, summary, models, curves, seconds, overlap))
    return summary
