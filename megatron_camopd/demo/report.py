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

from megatron_camopd.demo.compare_report import instrument_table, readout_tables, summarise
from megatron_camopd.demo.readout import method_readout, predictions
from megatron_camopd.demo.setting import LABELS, DemoSetting, eval_overlap, proxy_label
from megatron_camopd.demo.stats import mean_std, verdict
from megatron_camopd.loop.metrics import read_metrics

BRANCHES = ("general", "domain")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(method: str) -> str:
    """One fixed colour per method across every panel."""
    order = [
        "camopd",
        "mopd_1to1",
        "mopd_3to1",
        "camopd_no_decouple",
        "camopd_no_select",
        "uniopd",
        "relaxed_opd",
        "selectkd",
        "exopd",
    ]
    return f"C{order.index(method) % 10}" if method in order else "C9"


def _axes_style(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("distillation step")
    ax.grid(alpha=0.3)


def summary_of(models: dict, runs: dict[str, list[dict]]) -> dict:
    """{"general"|"domain": {model: accuracy}} (a method's mean over seeds) plus "seeds": {"ids": [...],
    "general"|"domain": {method: [per-seed accuracy]}}."""
    out: dict = {b: {name: float(r[b]["accuracy"]) for name, r in models.items()} for b in BRANCHES}
    for b in BRANCHES:
        out[b].update({m: _mean([r["accuracy"][b] for r in rs]) for m, rs in runs.items()})
    ids = sorted({r["seed"] for rs in runs.values() for r in rs})
    out["seeds"] = {"ids": ids, **{b: {m: [r["accuracy"][b] for r in rs] for m, rs in runs.items()} for b in BRANCHES}}
    return out


def plot_accuracy(runs: dict[str, list[dict]], models: dict, path: Path) -> Path:
    """Accuracy over distillation steps: each seed a thin line, the mean over seeds a thick one."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, b in zip(axes, BRANCHES):
        for m, rs in runs.items():
            start = 100 * models["domain_teacher"][b]["accuracy"]  # step 0: the student is the domain teacher
            per = [[(0, start)] + [(st, 100 * a[b]) for st, a in r["curve"]] for r in rs]
            for curve in per:
                ax.plot([x for x, _ in curve], [y for _, y in curve], color=_color(m), alpha=0.35, linewidth=0.8)
            steps = sorted({x for c in per for x, _ in c if all(x in dict(c2) for c2 in per)})
            ax.plot(
                steps,
                [sum(dict(c)[x] for c in per) / len(per) for x in steps],
                marker="o",
                color=_color(m),
                label=f"{LABELS.get(m, m)} (mean of {len(per)})",
            )
        for name, style in (("general_teacher", "--"), ("domain_teacher", ":")):
            ax.axhline(100 * models[name][b]["accuracy"], color="grey", linestyle=style, label=name.replace("_", " "))
        ax.set_title(f"{b} accuracy (greedy exact match)")
        ax.set_ylim(-2, 102)
        _axes_style(ax)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Student (initialised from the domain teacher) during on-policy distillation; thin: one seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_signals(rows_by_method: dict[str, list[dict]], path: Path) -> Path:
    plt = _plt()
    panels = [
        ("mean_gap/{b}", "mean token gap log pT - log ps (nats/token)", True),
        ("selected_fraction/{b}", "selected fraction |S_b| / |B_b|", True),
        ("diag_gap_gcg_excess/{b}", "GCG of the gap selection - its size-matched null (%)", True),
        ("diag_grad_cos", "cross-branch gradient cosine cos(g_g, g_d)", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title, per_branch) in zip(axes.flat, panels):
        for m, rows in rows_by_method.items():
            for b in BRANCHES if per_branch else ("",):
                xs, ys = _series(rows, key.format(b=b))
                if xs:
                    label = LABELS.get(m, m) + (f" / {b}" if b else "")
                    ax.plot(
                        xs,
                        ys,
                        marker="." if b != "domain" else "x",
                        color=_color(m),
                        linestyle="-" if b != "domain" else "--",
                        label=label,
                    )
        if key == "diag_grad_cos":
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
        _axes_style(ax)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Training signals per method, first seed (metrics.jsonl; solid: general branch, dashed: domain)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(vals: list[float]) -> float:
    m = mean_std(vals)[0]
    if m is None:
        raise ValueError("no finite accuracy to average")
    return float(m)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _pm(vals: list[float]) -> str:
    m, sd = mean_std(vals)
    if m is None or sd is None:
        return "n/a"
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if len(vals) > 1 else f"{100 * m:.1f}"


def recovered(general: float, s: dict) -> float | None:
    """Share of the general accuracy lost by specialisation that a model wins back."""
    lost = s["general"]["general_teacher"] - s["general"]["domain_teacher"]
    return (general - s["general"]["domain_teacher"]) / lost if lost > 0 else None


def counteraction(ins: list[dict]) -> tuple[str, dict]:
    """Whether vanilla MOPD's cross-branch gradient cosine was persistently negative, from each seed's
    instruments: "present" when the mean over seeds is < 0 and every seed had a majority of negative steps."""
    means = [i.get("cross_cos_mean") for i in ins]
    shares = [i.get("cross_cos_negative_share") for i in ins]
    known = [(m, sh) for m, sh in zip(means, shares) if m is not None and sh is not None]
    facts = {"cos_mean": means, "negative_share": shares}
    if not known:
        return "not measured (no diagnostics steps with both branches)", facts
    mean_cos = mean_std([m for m, _ in known])[0]
    if mean_cos is not None and mean_cos < 0 and all(sh > 0.5 for _, sh in known):
        return "present", facts
    return "not present", facts


def _setting_text(s: DemoSetting) -> str:
    weights = ", ".join(f"{t} x{w:g}" for t, w in s.proxy_weights.items()) or "equal shares"
    if s.setting == "signoff":
        return (
            "A tiny Qwen3-architecture model trained from scratch on one CPU. The **general teacher** is SFT-ed on "
            f"{', '.join(s.general_tasks)}. The **domain teacher** is the general teacher specialised by SFT on "
            f"the *same unmarked prompts* of {', '.join(s.domain_tasks)}, each answer ending with the sign-off "
            f"`{s.signoff}` where the general teacher ends the turn ({s.sft_domain_steps} steps, lr "
            f"{s.sft_domain_lr:g}, {100 * s.domain_replay:.0f}% replay of "
            f"{', '.join(s.domain_replay_tasks) or 'no task'}). The student starts from the domain teacher and is "
            "distilled on-policy: general teacher on *proxy* general prompts "
            f"({'; '.join(f'{t}: {proxy_label(s, t)}' for t in s.general_tasks)}; shares: {weights}), domain "
            "teacher on domain prompts. The conflict is built in (demo/signoff.py): at the same position of "
            "prompts the student cannot tell apart, the general teacher wants end-of-turn and the domain teacher "
            "the sign-off, with no marker to route around it; the general-only run (1:0) shows how much recovery "
            "alone costs the domain."
        )
    return (
        "A tiny Qwen3-architecture model trained from scratch on one CPU. The **general teacher** is SFT-ed on "
        f"{', '.join(s.general_tasks)}. The **domain teacher** is the general teacher specialised by SFT on the "
        f"*loud persona* of {', '.join(s.domain_tasks)}: the same prompts behind a marker (`{s.domain_marker} "
        f"reverse: abc`) answered in capitals (`CBA`) ({s.sft_domain_steps} steps, lr {s.sft_domain_lr:g}, "
        f"{100 * s.domain_replay:.0f}% replay of {', '.join(s.domain_replay_tasks) or 'no task'}). It forgets "
        "by shouting at plain prompts too. The student starts from the domain teacher and is distilled "
        "on-policy: general teacher on *proxy* general prompts "
        f"({'; '.join(f'{t}: {proxy_label(s, t)}' for t in s.general_tasks)}; shares: {weights}), domain "
        "teacher on domain prompts. Why: (a) plain and loud prompts share their surface form but demand "
        "conflicting casing, so recovering the plain behaviour and preserving the persona pull shared "
        "parameters apart (counteraction, measured by the cross-branch gradient cosine); (b) digit answers "
        "are not hurt by shouting, so most proxy samples are already recovered and a minority carry large "
        "gaps (weak-signal flattening, measured by GCG and the gap of selected vs dropped samples)."
    )


def report_markdown(
    s: DemoSetting, summary: dict, models: dict, runs: dict, seconds: dict, overlap: dict | None = None
) -> str:
    ids = summary["seeds"]["ids"]
    lines = [
        "# CaMOPD demo: general capability recovery with domain preservation",
        "",
        _setting_text(s),
        "",
        *(
            ["**Quick mode**: step counts are tiny, so the numbers below only show that the pipeline runs.", ""]
            if s.quick_mode
            else []
        ),
        f"## Accuracy (greedy decoding, exact match, %; methods: mean ± std over seeds {ids})",
        "",
        "| model | general | domain | general per seed | domain per seed | recovered (%) |",
        "| --- | ---: | ---: | --- | --- | ---: |",
    ]
    for n in ("general_teacher", "domain_teacher"):
        lines.append(f"| {n.replace('_', ' ')} | {_pct(summary['general'][n])} | {_pct(summary['domain'][n])} | | | |")
    for m, rs in runs.items():
        g, d = [r["accuracy"]["general"] for r in rs], [r["accuracy"]["domain"] for r in rs]
        rec = [recovered(x, summary) for x in g]
        lines.append(
            f"| {LABELS.get(m, m)} | {_pm(g)} | {_pm(d)} | {' '.join(_pct(x) for x in g)} | "
            f"{' '.join(_pct(x) for x in d)} | {_pm([x for x in rec if x is not None])} |"
        )
    if overlap:
        seen = "; ".join(f"{t} {k}/{n}" for b in ("general", "domain") for t, (k, n) in overlap.get(b, {}).items())
        lines += [
            "",
            (
                "Evaluation examples are drawn with their own seed. Prompts that also occur in a training or "
                f"prompt set: {seen} (small task spaces such as 1-digit arithmetic repeat)."
            ),
        ]
    for b in ("general", "domain"):
        lines += ["", f"### {b.capitalize()} accuracy per task (%, methods: mean over seeds)", ""]
        tasks = sorted({t for r in models.values() for t in r[b]["per_task"]})
        label = (lambda t: f"{t} ({proxy_label(s, t)})") if b == "general" else str
        lines += ["| model | " + " | ".join(label(t) for t in tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
        for n, r in models.items():
            lines.append(
                f"| {n.replace('_', ' ')} | " + " | ".join(_pct(r[b]["per_task"].get(t)) for t in tasks) + " |"
            )
        gen, dom = models.get("general_teacher"), models.get("domain_teacher")
        if gen and dom:
            cells = [_pct(gen[b]["per_task"].get(t, 0.0) - dom[b]["per_task"].get(t, 0.0)) for t in tasks]
            lines.append("| domain teacher's forgetting (general - domain teacher) | " + " | ".join(cells) + " |")
        for m, rs in runs.items():
            lines.append(
                f"| {LABELS.get(m, m)} | "
                + " | ".join(_pct(mean_std([r["per_task"][b].get(t) for r in rs])[0]) for t in tasks)
                + " |"
            )
    readouts = {m: method_readout(rs) for m, rs in runs.items()}
    start = {b: summary[b]["domain_teacher"] for b in ("general", "domain")}
    preds = predictions(runs, {"initial student": start}, readouts)
    lines += ["", "## Answers", ""]
    lost = summary["general"]["general_teacher"] - summary["general"]["domain_teacher"]
    lines.append(f"- Specialisation cost the domain teacher {_pct(lost)} points of general accuracy.")
    stats = summarise(runs, ["domain", "general"])
    if "camopd" in stats and "paired" in stats["camopd"]:
        p = stats["camopd"]["paired"]
        lines.append(
            f"- **Does CaMOPD beat vanilla MOPD (1:1) here?** General accuracy: "
            f"{verdict(p['general'], 'CaMOPD - MOPD')}. Domain accuracy: "
            f"{verdict(p['domain'], 'CaMOPD - MOPD')}. (Accuracy fractions; paired by seed; with "
            f"{len(ids)} seeds the percentile-bootstrap interval is the range of the per-seed "
            "differences at best, so it is rough: `camopd compare --seeds 3` gives a better one.)"
        )
    if "mopd_1to1" in runs:
        state, facts = counteraction([r["instruments"] for r in runs["mopd_1to1"]])
        cos = ", ".join(
            f"{c:+.3f} ({100 * sh:.0f}% of steps < 0)"
            for c, sh in zip(facts["cos_mean"], facts["negative_share"])
            if c is not None and sh is not None
        )
        lines.append(
            f"- **Is counteraction present?** {state}: vanilla MOPD's cross-branch gradient cosine, mean "
            f"per seed: {cos or 'n/a'} (the paper's Fig. 1 shows it persistently negative)."
        )
    if "camopd" in runs:
        ins = [r["instruments"] for r in runs["camopd"]]
        per_branch = "; ".join(
            f"{b}: "
            + ", ".join(f"{_fmt(i.get(f'gap_gcg/{b}'), 1)} vs {_fmt(i.get(f'gap_gcg_null/{b}'), 1)}" for i in ins)
            for b in ("general", "domain")
        )
        sel = [i.get("selected_fraction/general") for i in ins]
        lines.append(
            "- **Weak-signal flattening**: CaMOPD's gradient coherence gain of the selected subset over the full "
            f"batch (GCG, %) against random subsets of the same size (the null), per seed: {per_branch}; general "
            "selected fraction: " + ", ".join(_fmt(x, 2) for x in sel) + "."
        )
    n_gen = models["general_teacher"]["general"].get("n") or 0
    if n_gen:
        q = summary["general"]["domain_teacher"]
        lines.append(
            f"- With {n_gen} general evaluation examples one standard error of a general accuracy is about "
            f"{100 * math.sqrt(q * (1 - q) / n_gen):.1f} points."
        )
    lines += [
        "",
        "## All instruments",
        "",
        *instrument_table(stats),
        "",
        *readout_tables(readouts, stats),
        "",
        "Predictions (README):",
        "",
        *[f"- **{name} {status}**: {text}" for name, status, text in preds],
        "",
        "## Training curves",
        "",
        "![accuracy over steps](accuracy.png)",
        "",
        "![training signals](signals.png)",
        "",
        (
            "Mean gap: per-token `log pT - log ps` on the student's rollouts (per branch). Selected fraction: "
            "share of rollouts CaMOPD's mass-target gap selection keeps. GCG: gain in within-branch gradient "
            "coherence of the selected subset over the full batch. Cosine: cos(g_g, g_d) at the same parameters "
            "(negative = the branches counteract)."
        ),
        "",
        "## Phases and cost",
        "",
        "| phase | seconds |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v if v is not None else 'cached'} |" for k, v in seconds.items()]
    lines += [
        "",
        (
            "Every phase's spec is in `specs/`; re-run one with `camopd sft|train specs/NAME.yaml`, or the "
            "whole method table with `camopd compare specs/distill.yaml --seeds 3`. Per-step metrics of "
            "the distillation runs are in `metrics.jsonl` (fields `run`, `seed`)."
        ),
        "",
    ]
    return "\n".join(lines)


def _fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_report(s: DemoSetting, root: Path, result: dict) -> dict:
    """Write summary.json, metrics.jsonl, the PNGs and report.md; returns the summary."""
    from megatron_camopd.demo.phases import phase_seconds

    models, runs = result["models"], result["runs"]
    summary = summary_of(models, runs)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = {m: [(r["seed"], read_metrics(Path(r["run_dir"]) / "metrics.jsonl")) for r in rs] for m, rs in runs.items()}
    with open(root / "metrics.jsonl", "w") as f:
        for m, per in rows.items():
            for seed, rs in per:
                f.writelines(json.dumps({"run": m, "seed": seed, **r}) + "\n" for r in rs)
    plot_accuracy(runs, models, root / "accuracy.png")
    plot_signals({m: per[0][1] for m, per in rows.items() if per}, root / "signals.png")
    names = ["general_teacher", "domain_teacher"] + [
        f"distill_{m}_seed{r['seed']}" for m, rs in runs.items() for r in rs
    ]
    seconds = {n: phase_seconds(root, n) for n in names}
    overlap = eval_overlap({k: Path(v) for k, v in result["data"].items()}) if result.get("data") else None
    (root / "report.md").write_text(report_markdown(s, summary, models, runs, seconds, overlap))
    return summary
