"""The comparison's outputs: per-method statistics over seeds, the markdown tables, `compare.json` and a plot.

`summarise` turns the per-run results of `compare.run_comparison` into, per method: mean ± std of every domain's
accuracy and of the normalised score; the paired difference against vanilla MOPD (1:1) on the same seed with its
bootstrap 95% CI; the mean of every instrument over seeds; and the training seconds. The markdown states the
cost and reads each interval in words (`stats.verdict`); the plot shows per-seed points, means, and the paired
differences with their intervals. Used by `camopd compare` and by the demo's report.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_camopd.demo.readout import method_readout, predictions
from megatron_camopd.demo.setting import LABELS
from megatron_camopd.demo.stats import mean_std, paired_difference, verdict

BASELINE = "mopd_1to1"
INSTRUMENTS = [
    ("coherence_full/general", "coherence (gen)"),
    ("coherence_full/domain", "coherence (dom)"),
    ("spearman_gap_len/general", "Spearman gap~len (gen)"),
    ("spearman_gap_len/domain", "Spearman gap~len (dom)"),
    ("selected_len_mean/general", "selected len (gen)"),
    ("dropped_len_mean/general", "dropped len (gen)"),
]


def _accuracy(domain: str, run: dict) -> Any:
    return run["accuracy"][domain]


def _by_seed(runs: list[dict], get) -> dict[int, float | None]:
    return {r["seed"]: get(r) for r in runs}


def summarise(results: dict[str, list[dict]], domains: list[str], baseline: str = BASELINE) -> dict:
    """{method: {"accuracy": {d: [mean, std]}, "score": [mean, std], "paired": {d|score: diff}, "instruments":
    {k: mean}, "seconds": total}} (paired only when the baseline ran, on the seeds both ran)."""
    metrics: dict[str, Callable[[dict], Any]] = {d: functools.partial(_accuracy, d) for d in domains}
    metrics["score"] = lambda r: r["normalised"]["score"]
    out: dict[str, dict] = {}
    for m, runs in results.items():
        s: dict = {
            "accuracy": {d: list(mean_std([r["accuracy"][d] for r in runs])) for d in domains},
            "score": list(mean_std([r["normalised"]["score"] for r in runs])),
            "seeds": [r["seed"] for r in runs],
            "seconds": round(sum(r.get("seconds") or 0.0 for r in runs), 1),
        }
        keys = sorted({k for r in runs for k in r.get("instruments", {})})
        s["instruments"] = {k: mean_std([r["instruments"].get(k) for r in runs])[0] for k in keys}
        if baseline in results and m != baseline:
            base = results[baseline]
            s["paired"] = {}
            for key, get in metrics.items():
                mine, theirs = _by_seed(runs, get), _by_seed(base, get)
                common = sorted(set(mine) & set(theirs))
                s["paired"][key] = paired_difference([mine[k] for k in common], [theirs[k] for k in common])
        out[m] = s
    return out


def _cell(ms, scale: float = 100.0, digits: int = 1) -> str:
    m, sd = ms
    return "n/a" if m is None else f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def _diff(d: dict | None, scale: float = 100.0) -> str:
    if not d or d["mean"] is None:
        return "—"
    if d["ci_low"] is None:
        return f"{scale * d['mean']:+.1f}"
    return f"{scale * d['mean']:+.1f} [{scale * d['ci_low']:+.1f}, {scale * d['ci_high']:+.1f}]"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def tables(summary: dict, domains: list[str], baselines: dict) -> list[str]:
    """The results table (mean ± std, paired differences vs MOPD 1:1 with CI) and the instruments table."""
    head = (
        "| method | "
        + " | ".join(f"{d} acc (%)" for d in domains)
        + " | score (mean s_d) | "
        + " | ".join(f"Δ{d} vs MOPD 1:1 [95% CI]" for d in domains)
        + " | Δscore [95% CI] | seconds |"
    )
    lines = [head, "| --- |" + " ---: |" * (2 * len(domains) + 3)]
    for name, acc in baselines.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * acc[d]:.1f}" for d in domains) + " |" + " |" * (len(domains) + 3)
        )
    for m, s in summary.items():
        p = s.get("paired", {})
        cells = [_cell(s["accuracy"][d]) for d in domains] + [_cell(s["score"], 1.0, 2)]
        cells += [_diff(p.get(d)) for d in domains] + [_diff(p.get("score"), 1.0)]
        cells.append(f"{s['seconds']:.0f}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines + [
        "",
        "Gap vs length and coherence (means over seeds, from each run's metrics.jsonl):",
        "",
        *instrument_table(summary),
    ]


def _f(x, digits: int = 2, sign: bool = False) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _iv(point, ci, digits: int = 2) -> str:
    if point is None:
        return "n/a"
    return f"{point:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def _excess(d: dict) -> str:
    if d["mean"] is None:
        return "n/a"
    return f"{d['mean']:+.1f}" + (f" [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]" if d["ci_low"] is not None else "")


def readout_tables(readouts: dict, summary: dict) -> list[str]:
    """The cross-branch instruments with their noise floors, and GCG against its size-matched null, per method."""
    lines = [
        "Cross-branch instruments (diagnostic steps pooled over seeds; step 0 never diagnosed; intervals: 95% "
        "two-level bootstrap, seeds then steps). `rel`: split-half reliability of each branch's batch gradient "
        "(Spearman-Brown), the noise floor; corrected cos = cos / sqrt(rel_g rel_d). dot<0: share of diagnostic "
        "steps with <g_g, g_d> < 0, mean over seeds (lowest seed). counteracted = -<g_g, g_d> / ||g_g||^2.",
        "",
        "| method | cross steps, all seeds (G/D diagnosed per seed) | dot<0 share | cos [CI] | corrected cos [CI] "
        "| rel_g | rel_d | ||g_d||/||g_g|| | counteracted |",
        "| --- |" + " ---: |" * 8,
    ]
    for m, r in readouts.items():
        c, ins = r["cosine"], summary[m]["instruments"]
        steps = f"{c['steps']} ({_f(ins.get('diag_steps/general'), 0)}/{_f(ins.get('diag_steps/domain'), 0)})"
        neg = (
            "n/a"
            if r["dot_negative_share"] is None
            else f"{100 * r['dot_negative_share']:.0f}% ({100 * r['dot_negative_share_min']:.0f}%)"
        )
        undefined = c.get("corrected_undefined") or 0.0
        corr = _iv(c["corrected"], c["corrected_ci"]) + (f" ({100 * undefined:.0f}% undef.)" if undefined else "")
        lines.append(
            f"| {LABELS.get(m, m)} | {steps} | {neg} | {_iv(c['cos'], c['cos_ci'])} | {corr} "
            f"| {_f(r['reliability']['general'])} | {_f(r['reliability']['domain'])} | {_f(r['norm_ratio'])} "
            f"| {_f(r['counteracted'], sign=True)} |"
        )
    lines += [
        "",
        "GCG (%) of the gap selection CaMOPD makes (measured in every method's batches) against random subsets of "
        "the same size (the null: a smaller subset is more coherent even at random), and the method's own "
        "selection (CaMOPD: the same; random ablation: should read as its null). Excess = GCG - null, mean over "
        "seeds [95% CI]. precision: share of the selected that carry the conflict (base rate: of the batch).",
        "",
        "| method | GCG gen / null | excess gen | GCG dom / null | excess dom | own excess gen | own excess dom "
        "| precision / base gen | precision / base dom |",
        "| --- |" + " ---: |" * 8,
    ]
    for m, r in readouts.items():
        g, own = r["gcg"], r["own_gcg"]
        cells = []
        for b in ("general", "domain"):
            cells += [f"{_f(g[b]['gcg'], 1)} / {_f(g[b]['null'], 1)}", _excess(g[b]["excess"])]
        cells += [_excess(own[b]["excess"]) for b in ("general", "domain")]
        cells += [f"{_f(g[b]['precision'])} / {_f(g[b]['base_rate'])}" for b in ("general", "domain")]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    groups = sorted(
        {k.split("/", 1)[1] for s in summary.values() for k in s["instruments"] if k.startswith("tensor_cos/")}
    )
    if groups:
        lines += [
            "",
            "Per-tensor breakdown (means over seeds): cosine of <g_g, g_d> within each parameter role / its share "
            "of the total dot product.",
            "",
            "| method | " + " | ".join(groups) + " |",
            "| --- |" + " ---: |" * len(groups),
        ]
        for m, s in summary.items():
            ins = s["instruments"]
            if ins.get(f"tensor_cos/{groups[0]}") is None:
                continue
            cells = [
                f"{_f(ins.get(f'tensor_cos/{g}'), sign=True)} / {_f(ins.get(f'tensor_dot_share/{g}'))}" for g in groups
            ]
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def task_table(results: dict, domains: list[str], baseline_tasks: dict) -> list[str]:
    """Accuracy per task (mean over seeds), general and domain tasks apart, with the domain teacher's forgetting
    (general teacher - domain teacher) on every task."""
    found = {(d, t) for runs in results.values() for r in runs for d in domains for t in r["per_task"].get(d, {})}
    found |= {(d, t) for b in baseline_tasks.values() for d in domains for t in b.get(d, {})}
    tasks = sorted(found)
    if not tasks:
        return []
    head = "| model | " + " | ".join(f"{d}: {t}" for d, t in tasks) + " |"
    lines = ["Per task (%), mean over seeds:", "", head, "| --- |" + " ---: |" * len(tasks)]
    for name, per in baseline_tasks.items():
        lines.append(f"| {name} | " + " | ".join(_pct(per.get(d, {}).get(t)) for d, t in tasks) + " |")
    gen = next((v for k, v in baseline_tasks.items() if k == "teacher general"), None)
    dom = baseline_tasks.get("initial student")
    if gen and dom:
        cells = [
            _pct(gen[d][t] - dom[d][t], sign=True) if t in gen.get(d, {}) and t in dom.get(d, {}) else "n/a"
            for d, t in tasks
        ]
        lines.append("| domain teacher's forgetting (general teacher - domain teacher) | " + " | ".join(cells) + " |")
    for m, runs in results.items():
        cells = [_pct(mean_std([r["per_task"].get(d, {}).get(t) for r in runs])[0]) for d, t in tasks]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def _pct(x, sign: bool = False) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def instrument_table(summary: dict) -> list[str]:
    """The referee's instruments per method (means over seeds)."""
    lines = [
        "| method | " + " | ".join(label for _, label in INSTRUMENTS) + " |",
        "| --- |" + " ---: |" * len(INSTRUMENTS),
    ]
    for m, s in summary.items():
        ins = s["instruments"]
        lines.append(
            f"| {LABELS.get(m, m)} | "
            + " | ".join(_num(ins.get(k), 2 if "len" in k else 3) for k, _ in INSTRUMENTS)
            + " |"
        )
    return lines


def plot(summary: dict, results: dict, domains: list[str], path: Path) -> Path:
    """Per domain: per-seed accuracies (dots) and their mean (bar); last panel: paired differences vs MOPD 1:1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, len(domains) + 1, figsize=(5 * (len(domains) + 1), 4.5))
    for ax, d in zip(axes, domains):
        for i, m in enumerate(methods):
            ax.bar(i, 100 * (summary[m]["accuracy"][d][0] or 0.0), color=f"C{i % 10}", alpha=0.5)
            ax.scatter([i] * len(results[m]), [100 * r["accuracy"][d] for r in results[m]], color="black", s=12)
        ax.set_xticks(range(len(methods)), [LABELS.get(m, m) for m in methods], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{d} accuracy (%), per seed and mean")
        ax.grid(alpha=0.3, axis="y")
    ax = axes[-1]
    shown = [m for m in methods if "paired" in summary[m]]
    for j, d in enumerate(domains):
        for i, m in enumerate(shown):
            p = summary[m]["paired"][d]
            if p["mean"] is None:
                continue
            lo = p["ci_low"] if p["ci_low"] is not None else p["mean"]
            hi = p["ci_high"] if p["ci_high"] is not None else p["mean"]
            x = i + (j - (len(domains) - 1) / 2) * 0.25
            ax.errorbar(
                [x],
                [100 * p["mean"]],
                yerr=[[100 * (p["mean"] - lo)], [100 * (hi - p["mean"])]],
                fmt="o",
                color=f"C{j}",
                capsize=3,
                label=d if i == 0 else None,
            )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(-0.6, max(len(shown), 1) - 0.4)
    ax.set_xticks(range(len(shown)), [LABELS.get(m, m) for m in shown], rotation=45, ha="right", fontsize=8)
    ax.set_title("paired difference vs MOPD (1:1), points (95% CI)")
    if shown:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(
    out: Path,
    spec_path: Path,
    domains: list[str],
    baselines: dict,
    results: dict,
    *,
    threads: int,
    baseline_tasks: dict | None = None,
) -> str:
    """compare.md, compare.json and compare.png under `out`; returns the markdown."""
    summary = summarise(results, domains)
    readouts = {m: method_readout(runs) for m, runs in results.items()}
    preds = predictions(results, baselines, readouts)
    total = sum(s["seconds"] for s in summary.values())
    n_seeds = max((len(r) for r in results.values()), default=0)
    md = [
        "# Method comparison",
        "",
        (
            f"Spec: `{spec_path}`; {n_seeds} seed(s) per method (train.seed = data.seed = k); greedy exact match on "
            "held-out sets; `s_d = (a_method - a_student) / (a_teacher - a_student)` (n/a where the teacher does not "
            "beat the initial student by >= 1 point). Δ: the method minus vanilla MOPD (1:1) on the same seed, mean "
            "over seeds with a percentile-bootstrap 95% interval (with 2-3 seeds the interval is rough; with one, "
            "none)."
        ),
        "",
        *tables(summary, domains, baselines),
        "",
        *task_table(results, domains, baseline_tasks or {}),
        "",
        *readout_tables(readouts, summary),
        "",
        "Predictions (stated in the README before the runs; read here from the numbers above):",
        "",
        *[f"- **{name} {status}**: {text}" for name, status, text in preds],
        "",
        f"Cost: {total:.0f} s of training for {sum(len(r) for r in results.values())} runs at {threads} torch "
        "thread(s) (evaluation not included).",
        "",
    ]
    for m, s in summary.items():
        for key in [*domains, "score"]:
            if "paired" in s:
                md.append(f"- {verdict(s['paired'][key], f'{LABELS.get(m, m)} - MOPD (1:1), {key}')}")
    md.append("")
    text = "\n".join(md)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(
        json.dumps(
            {
                "spec": str(spec_path),
                "seeds": n_seeds,
                "domains": domains,
                "baselines": baselines,
                "results": results,
                "summary": summary,
                "readouts": readouts,
                "predictions": preds,
                "baseline_tasks": baseline_tasks or {},
                "training_seconds": total,
                "threads": threads,
            },
            indent=1,
        )
    )
    plot(summary, results, domains, out / "compare.png")
    return text
