"""The demo's synthetic setting: task mix, model size, step counts, and the spec of every phase.

The CaMOPD paper's setting in miniature, built so that its two failure modes can be measured, not assumed:
- a general teacher (a tiny Qwen3 model SFT-ed on arithmetic, reversal, sorting and copying);
- a domain teacher: that model specialised on the *loud persona* of reversal and copying -- the same prompts behind
  a marker (`! reverse: abc`) answered in capitals (`CBA`), at a high learning rate with a little replay. Plain and
  loud prompts share their surface form but demand conflicting behaviour, so it forgets by shouting at plain
  prompts and by drifting; recovering the plain behaviour and preserving the persona pull the same parameters
  (counteraction: the instrument is the cross-branch gradient cosine, the paper's Fig. 1);
- proxy general prompts that cover the general distribution incompletely (the longer strings of each task; the
  evaluation also has the shorter ones, like the paper's Nemotron proxy) with unequal correction demand: mostly
  digit prompts (arithmetic, which shouting cannot damage and replay keeps mostly intact) and a minority of
  letter prompts carrying large gaps (weak-signal flattening: the instruments are GCG, the coherence gain of the
  gap-selected subset, and the gap of selected vs dropped samples).
What the instruments showed in the default setting is in the README and each run's report: GCG > 0 throughout,
and *no* persistent negative cosine (the counteraction the setting was built for does not show at this size).
`DemoSetting.quick()` shrinks everything for CI. Specs are plain dicts written as YAML files so every phase can be
re-run by hand with `camopd sft|train SPEC`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from megatron_camopd.data.synthetic import (
    make_examples,
    make_loud_examples,
    read_jsonl,
    task_of,
    write_jsonl,
)
from megatron_camopd.demo.signoff import SIGNOFF, make_signoff_examples

# The settings of `camopd demo --setting NAME`: DemoSetting fields that differ from the defaults (= "loud").
# "signoff": demo/signoff.py. Its domain is reverse/sort/copy answered with the sign-off; the proxy is every
# general task at equal shares (letter prompts are three quarters of it and all carry the conflict)
SETTINGS: dict[str, dict[str, Any]] = {
    "loud": {},
    "signoff": {
        "setting": "signoff",
        "domain_tasks": {"reverse": [3, 5], "sort": [3, 5], "copy": [3, 6]},
        "proxy_weights": {"arithmetic": 1.0, "reverse": 1.0, "sort": 1.0, "copy": 1.0},
        "domain_replay": 0.1,
        "domain_replay_tasks": ["arithmetic"],
        "demo_methods": ["opd_general", "mopd_1to1", "camopd"],
        # recovery is fast here (1:0 has 88% general at step 32 of 160): 96 steps, ~100 s a run at 1 thread;
        # diagnostics at 16 mixed steps, or 12 general + 12 domain steps of G,G,G,D
        "distill_steps": 96,
        "eval_every": 24,
        "diagnostics_interval": 6,
        "diagnostics_interval_domain": 2,
    },
}


@dataclass
class DemoSetting:
    """Every knob of the demo (hashed to decide which cached phases are still valid)."""

    seed: int = 0
    # which setting (SETTINGS): "loud" (the domain is a marked persona of some general tasks) or "signoff" (the
    # domain answers the same unmarked prompts and ends with a sign-off token where the general teacher stops)
    setting: str = "loud"
    signoff: str = SIGNOFF  # the "signoff" setting's domain sign-off (one token)
    # model (tiny Qwen3 from scratch)
    hidden: int = 256  # 128: the domain drifts more during distillation (87.5 -> 77.5 in 96 steps)
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    # tasks: general tasks (name -> (lo, hi) length range). The domain is the "loud" persona of some of them:
    # the same prompt behind a marker ("! reverse: abc"), answered in capitals ("CBA"). Sharing its surface form
    # with the plain tasks is what makes recovery and preservation conflict (see DESIGN below)
    general_tasks: dict[str, list[int]] = field(
        default_factory=lambda: {"arithmetic": [1, 1], "reverse": [3, 5], "sort": [3, 5], "copy": [3, 6]}
    )
    domain_tasks: dict[str, list[int]] = field(default_factory=lambda: {"reverse": [3, 5], "copy": [3, 6]})
    domain_marker: str = "!"
    # the proxy: every general task, but its strings shifted to the longer lengths (no 3-character strings, which
    # the evaluation has), like the paper's Nemotron proxy that covers the general teacher's distribution
    # incompletely; `proxy_weights` sets each task's share (unequal correction demand: digit answers are not
    # damaged by shouting, letter answers are)
    proxy_tasks: list[str] = field(default_factory=lambda: ["arithmetic", "reverse", "sort", "copy"])
    proxy_lengths: dict[str, list[int]] = field(
        default_factory=lambda: {"reverse": [4, 5], "sort": [4, 5], "copy": [4, 6]}
    )  # task -> (lo, hi) shifted for the proxy
    # task -> share of n_train (default 1.0): mostly digit prompts (already recovered), a minority of letter ones
    proxy_weights: dict[str, float] = field(
        default_factory=lambda: {"arithmetic": 3.0, "reverse": 0.5, "sort": 0.5, "copy": 0.5}
    )
    # share of general examples mixed into the domain SFT data. Measured (seed 0; general / domain accuracy of
    # the domain teacher, then CaMOPD after 160 PG steps): replay 0.1 of arithmetic only: 23.5 / 98.5 -- it
    # shouts at every letter prompt, puts ~no mass on lower case, and neither CaMOPD nor MOPD recovers anything
    # (PG or top-k: on-policy rollouts never show the right tokens); 0.05 of every task at lr 2e-3, 150 steps:
    # 45.5 / 95.5 -> CaMOPD 75.5 / 87.5; 0.1 of every task (the default): 55.0 / 99.0 -> 74.3 / 97.5
    domain_replay: float = 0.1
    domain_replay_tasks: list[str] = field(default_factory=lambda: ["arithmetic", "reverse", "sort", "copy"])
    n_train: int = 2000  # per task
    n_eval: int = 100  # per task, fresh examples (own seed; see eval_overlap)
    # phases
    sft_general_steps: int = 1000
    sft_general_lr: float = 5e-3
    sft_domain_steps: int = 200
    sft_domain_lr: float = 3e-3
    sft_batch: int = 64
    distill_steps: int = 160  # at a constant lr 3e-4 CaMOPD flattened by ~160 (81.2% at 160, 81.0 at 192, 80.3 at 224)
    # cosine from 4e-4 to 3e-5. Measured (1 thread): 8e-4 cosine: CaMOPD 46% recovery (MOPD 64%); constant 3e-4:
    # a plateau by ~100 steps; constant 1e-3: CaMOPD's general accuracy collapses
    distill_lr: float = 4e-4
    distill_lr_decay: str = "cosine"  # or "constant", "linear"
    distill_min_lr: float = 3e-5
    distill_batch: int = 64  # 32: slower recovery per step and more domain drift
    distill_loss: str = "pg"  # the paper's objective (Eq. 9): sampled-token policy gradient; "topk": top-k matching
    rollout_temperature: float = 1.0  # 0.7: no measurable change
    eval_every: int = 32
    max_new_tokens: int = 10
    # diagnostics every k-th step of each branch (counted per branch, so an alternating run visits both) from
    # step `diagnostics_start` (1: not step 0, where the student equals the domain teacher and the domain gradient
    # is float noise)
    diagnostics_interval: int = 8  # 160 steps: 20 mixed points, 15 general + 13 domain ones in G,G,G,D
    diagnostics_interval_domain: int | None = 3  # None: the same as diagnostics_interval
    diagnostics_start: int = 1
    diagnostics_samples: int = 16  # per-sample gradients per branch for coherence/GCG (one backward each)
    demo_methods: list[str] = field(default_factory=lambda: ["camopd", "mopd_1to1"])
    distill_seeds: int = 2  # seeds per method (train.seed = data.seed = seed + k); the teachers are shared
    quick_mode: bool = False

    def __post_init__(self) -> None:
        from megatron_camopd.errors import SpecError

        for name in ("domain_tasks", "proxy_tasks", "domain_replay_tasks", "proxy_weights", "proxy_lengths"):
            unknown = [t for t in getattr(self, name) if t not in self.general_tasks]
            if unknown:
                raise SpecError(
                    f"demo setting {name}: {', '.join(map(str, unknown))} not among general_tasks "
                    f"({', '.join(self.general_tasks)})"
                )
        if self.distill_seeds < 1:
            raise SpecError(f"demo setting distill_seeds: must be >= 1, got {self.distill_seeds}")
        if self.setting not in SETTINGS:
            raise SpecError(f"demo setting: unknown setting {self.setting!r} (known: {', '.join(SETTINGS)})")
        if self.setting == "signoff" and len(self.signoff) != 1:
            raise SpecError(f"demo setting signoff: must be one character (one token), got {self.signoff!r}")

    @classmethod
    def named(cls, name: str, seed: int = 0, quick: bool = False) -> DemoSetting:
        """The setting `name` (SETTINGS), full size or (`quick`) shrunk for CI."""
        from megatron_camopd.errors import SpecError

        if name not in SETTINGS:
            raise SpecError(f"--setting {name!r}: expected one of {', '.join(SETTINGS)}")
        base = cls.quick(seed) if quick else cls(seed=seed)
        changes = SETTINGS[name]
        if quick:  # the sizes quick() shrinks stay shrunk
            default = cls(seed=seed)
            changes = {k: v for k, v in changes.items() if getattr(base, k) == getattr(default, k)}
        return dataclasses.replace(base, **changes)

    def conflict_tokens(self) -> list[str]:
        """Tokens whose presence in a general rollout (absence from a domain rollout) marks a sample that carries
        the cross-branch conflict: the sign-off, or capital letters (shouting) in the loud setting."""
        return [self.signoff] if self.setting == "signoff" else list(string.ascii_uppercase)

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSetting:
        """Tiny step counts: the whole pipeline in about a minute (structure only, not the story)."""
        return cls(
            seed=seed,
            hidden=32,
            layers=1,
            heads=2,
            kv_heads=1,
            intermediate=64,
            n_train=64,
            n_eval=8,
            sft_general_steps=4,
            sft_domain_steps=3,
            sft_batch=8,
            distill_steps=4,
            distill_batch=8,
            eval_every=2,
            max_new_tokens=6,
            diagnostics_interval=1,
            distill_seeds=1,
            quick_mode=True,
        )

    def with_overrides(self, items: list[str]) -> DemoSetting:
        """A copy with `key=value` items applied, e.g. `distill_steps=192` or `proxy_lengths={reverse: [4, 5]}`:
        values parsed and type-checked by the spec loader's rules (`config.yamlio.parse_scalar`,
        `checks.type_problem`; an int may stand for a float). Errors name the key."""
        from megatron_camopd.checks import type_hints, type_problem
        from megatron_camopd.config.yamlio import parse_scalar
        from megatron_camopd.errors import SpecError

        hints = {k: v for k, v in type_hints(DemoSetting).items() if k != "quick_mode"}
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or key not in hints:
                raise SpecError(f"--set {item!r}: expected KEY=VALUE with KEY one of: {', '.join(hints)}")
            value = parse_scalar(raw, f"--set {key}")
            if hints[key] is float and type(value) is int:
                value = float(value)
            problem = type_problem(value, hints[key])
            if problem:
                raise SpecError(f"--set {key}: {problem}")
            changes[key] = value
        return dataclasses.replace(self, **changes)


# Method variants of the comparison: name -> spec overrides (dotted key -> value). MOPD/CaMOPD keep the spec's
# loss form (pg or topk); the other methods are defined on the sampled-token policy gradient, so they force pg.
METHODS: dict[str, dict[str, Any]] = {
    # the precondition: recovery alone (general prompts only, 1:0); the domain's drop under it is the conflict
    "opd_general": {"method.name": "mopd", "schedule.mode": "mixed", "schedule.mix_ratio": [1, 0]},
    "mopd_1to1": {"method.name": "mopd", "schedule.mode": "mixed", "schedule.mix_ratio": [1, 1]},
    "mopd_3to1": {"method.name": "mopd", "schedule.mode": "mixed", "schedule.mix_ratio": [3, 1]},
    "camopd": {"method.name": "camopd", "schedule.mode": "alternate", "method.selection": True},
    "camopd_no_decouple": {
        "method.name": "camopd",
        "schedule.mode": "mixed",
        "schedule.mix_ratio": [1, 1],
        "method.selection": True,
    },
    "camopd_no_select": {"method.name": "camopd", "schedule.mode": "alternate", "method.selection": False},
    # selection's ablation: as many samples per branch as the gap prefix would keep, drawn at random
    "camopd_random": {
        "method.name": "camopd",
        "schedule.mode": "alternate",
        "method.selection": True,
        "method.selection_order": "random",
    },
    "uniopd": {
        "method.name": "uniopd",
        "method.loss": "pg",
        "schedule.mode": "mixed",
        "schedule.mix_ratio": [1, 1],
        "method.uniopd.online_balance": False,
    },  # + groups and verifiers: see method_overrides
    "relaxed_opd": {
        "method.name": "relaxed_opd",
        "method.loss": "pg",
        "schedule.mode": "mixed",
        "schedule.mix_ratio": [1, 1],
    },
    "selectkd": {
        "method.name": "selectkd",
        "method.loss": "pg",
        "schedule.mode": "mixed",
        "schedule.mix_ratio": [1, 1],
    },
    "exopd": {"method.name": "exopd", "method.loss": "pg", "schedule.mode": "mixed", "schedule.mix_ratio": [1, 1]},
}
LABELS = {
    "opd_general": "general-only OPD (1:0)",
    "mopd_1to1": "MOPD (1:1)",
    "mopd_3to1": "MOPD (3:1)",
    "camopd": "CaMOPD",
    "camopd_no_decouple": "CaMOPD w/o decoupling",
    "camopd_no_select": "CaMOPD w/o selection",
    "camopd_random": "CaMOPD, random subset",
    "uniopd": "Uni-OPD",
    "relaxed_opd": "Relaxed OPD",
    "selectkd": "SelecTKD",
    "exopd": "ExOPD",
}


def stable_hash(obj: Any) -> str:
    """A short hash of JSON-able settings (decides whether a cached phase is still valid)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Dotted overrides as `key=value` strings (values in YAML flow syntax)."""
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]


def method_overrides(
    method: str, verifiers: list[str], prompts_per_step: int, micro_batch_size: int, group: int = 4
) -> list[str]:
    """The overrides that turn a distillation spec into `method`. Uni-OPD gets groups of `group` rollouts per
    prompt (same rollouts per step: prompts_per_step // group prompts) and an exact-match verifier on every
    stream that has none (`verifiers`: the spec's per-stream verifier names)."""
    values = dict(METHODS[method])
    if method == "uniopd":
        prompts = max(1, prompts_per_step // group)
        values.update(
            {
                "rollout.n_samples": group,
                "rollout.prompts_per_step": prompts,
                "train.micro_batch_size": math.gcd(micro_batch_size, prompts * group),
            }
        )
        values.update({f"data.streams.{i}.verifier": "exact" for i, v in enumerate(verifiers) if v == "none"})
    return as_overrides(values)


def proxy_label(s: DemoSetting, task: str) -> str:
    """How the proxy covers a general task: "not in proxy", "proxy" or "proxy, lengths lo-hi of lo-hi"."""
    if task not in s.proxy_tasks:
        return "not in proxy"
    lo, hi = s.proxy_lengths.get(task, s.general_tasks[task])
    glo, ghi = s.general_tasks[task]
    return "proxy" if (lo, hi) == (glo, ghi) else f"proxy, lengths {lo}-{hi} of {glo}-{ghi}"


def _with_replay(domain: list[dict], general: list[dict], share: float, seed: int) -> list[dict]:
    """Domain examples plus a `share` of general ones (of the mixed set), shuffled with a seeded generator."""
    n = min(len(general), round(share / (1.0 - share) * len(domain))) if share > 0 else 0
    rng = random.Random(seed)
    mixed = domain + rng.sample(general, n)
    rng.shuffle(mixed)
    return mixed


def _span(rng: list[int]) -> tuple[int, int]:
    """A task's [shortest, longest] operand length."""
    low, high = rng
    return low, high


def write_data(s: DemoSetting, data_dir: Path) -> dict[str, Path]:
    """Training, prompt and evaluation sets (JSONL, chat `messages` + `answer`; evaluation with its own seed)."""
    data_dir.mkdir(parents=True, exist_ok=True)

    def examples(tasks: dict[str, list[int]], n: int, seed: int, domain: str) -> list[dict]:
        return [ex for t, rng in tasks.items() for ex in make_examples(t, n, seed, _span(rng), domain)]

    general = dict(s.general_tasks)
    proxy = {t: s.proxy_lengths.get(t, general[t]) for t in s.proxy_tasks}

    def loud(n: int, seed: int) -> list[dict]:
        """The domain's examples: the loud persona, or (signoff) the same prompts answered with the sign-off."""
        if s.setting == "signoff":
            return [
                ex
                for t, rng in s.domain_tasks.items()
                for ex in make_signoff_examples(t, n, seed, _span(rng), s.signoff)
            ]
        return [
            ex
            for t, rng in s.domain_tasks.items()
            for ex in make_loud_examples(t, n, seed, _span(rng), s.domain_marker)
        ]

    def proxy_examples() -> list[dict]:
        return [
            ex
            for t, rng in proxy.items()
            for ex in make_examples(
                t, round(s.n_train * s.proxy_weights.get(t, 1.0)), s.seed + 7, _span(rng), "general"
            )
        ]

    sets = {
        "sft_general": examples(general, s.n_train, s.seed, "general"),
        "sft_domain": _with_replay(
            loud(s.n_train, s.seed),
            examples({t: general[t] for t in s.domain_replay_tasks}, s.n_train, s.seed + 3, "general"),
            s.domain_replay,
            s.seed,
        ),
        "proxy_general": proxy_examples(),
        "prompts_domain": loud(s.n_train, s.seed + 7),
        "eval_general": examples(general, s.n_eval, s.seed + 1000, "general"),
        "eval_domain": loud(s.n_eval, s.seed + 1000),
    }
    return {name: write_jsonl(rows, data_dir / f"{name}.jsonl") for name, rows in sets.items()}


TRAIN_SETS = ("sft_general", "sft_domain", "proxy_general", "prompts_domain")


def eval_overlap(data: dict[str, Path]) -> dict[str, dict[str, list[int]]]:
    """Per evaluation set and task, [k, n]: k of its n prompts also occur in some training or prompt set.

    Evaluation examples are drawn with another seed, not de-duplicated against training: large task spaces
    (5-letter strings) barely overlap, small ones do (1-digit arithmetic has 200 distinct problems). The report
    prints these counts so "fresh examples" is never mistaken for "unseen problems"."""

    def prompts(path: Path) -> list[tuple[str, str]]:
        return [(task_of(r), r["messages"][-1]["content"]) for r in read_jsonl(path)]

    seen = {p for name in TRAIN_SETS for _, p in prompts(data[name])}
    out: dict[str, dict[str, list[int]]] = {}
    for name in ("eval_general", "eval_domain"):
        per = out.setdefault(name.removeprefix("eval_"), {})
        for task, p in prompts(data[name]):
            k_n = per.setdefault(task, [0, 0])
            k_n[0] += p in seen
            k_n[1] += 1
    return out


def _common(s: DemoSetting, name: str, ckpt_dir: Path, steps: int, lr: float, batch: int, save_interval: int):
    return {
        "name": name,
        "rollout": {"prompts_per_step": batch, "temperature": 1.0, "max_new_tokens": s.max_new_tokens},
        "train": {
            "steps": steps,
            "seed": s.seed,
            "micro_batch_size": batch,
            "lr": lr,
            "min_lr": lr / 10,
            "lr_decay": "cosine",
            "warmup_steps": min(10, steps // 10),
            "weight_decay": 0.0,
            "clip_grad": 1.0,
        },
        "parallel": {"tp": 1, "pp": 1},
        "checkpoint": {"dir": str(ckpt_dir), "save_interval": save_interval, "keep_last": None, "resume": "never"},
        "logging": {"log_interval": max(1, steps // 10), "progress": "lines"},
    }


def sft_spec(
    s: DemoSetting, name: str, model: dict, data: Path, domain: str, ckpt_dir: Path, steps: int, lr: float
) -> dict:
    """Response-only SFT of `model` ({"hf_path": ...} or {"checkpoint": ...}) on one JSONL file."""
    spec = _common(s, name, ckpt_dir, steps, lr, s.sft_batch, 0)
    spec.update(
        model={**model, "dtype": "fp32", "seq_length": 64},
        data={
            "streams": [{"name": domain, "path": str(data), "format": "messages", "domain": domain}],
            "max_prompt_tokens": 48,
            "seed": s.seed,
        },
        method={"name": "sft"},
    )
    return spec


def distill_spec(
    s: DemoSetting,
    name: str,
    student: Path,
    general_teacher: Path,
    domain_teacher: Path,
    data: dict[str, Path],
    ckpt_dir: Path,
) -> dict:
    """CaMOPD from the domain teacher (the method section is then overridden per variant, see METHODS)."""
    spec = _common(s, name, ckpt_dir, s.distill_steps, s.distill_lr, s.distill_batch, s.eval_every)
    spec["train"].update(lr_decay=s.distill_lr_decay, warmup_steps=0, min_lr=s.distill_min_lr)
    spec["rollout"].update(temperature=s.rollout_temperature)
    spec["logging"].update(
        diagnostics=True,
        diagnostics_interval=s.diagnostics_interval,
        diagnostics_interval_domain=s.diagnostics_interval_domain,
        diagnostics_start=s.diagnostics_start,
        diagnostics_samples=s.diagnostics_samples,
        diagnostics_conflict_tokens=s.conflict_tokens(),
        log_interval=1,
    )
    spec.update(
        model={"checkpoint": str(student), "dtype": "fp32", "seq_length": 64},
        teachers={"general": {"checkpoint": str(general_teacher)}, "domain": {"checkpoint": str(domain_teacher)}},
        routing={"general": "general", "domain": "domain"},
        data={
            "streams": [
                {
                    "name": "proxy_general",
                    "path": str(data["proxy_general"]),
                    "format": "messages",
                    "domain": "general",
                    "branch": "general",
                },
                {
                    "name": "domain",
                    "path": str(data["prompts_domain"]),
                    "format": "messages",
                    "domain": "domain",
                    "branch": "domain",
                },
            ],
            "max_prompt_tokens": 48,
            "seed": s.seed,
        },
        method={"name": "camopd", "loss": s.distill_loss, "selection": True},
        schedule={"mode": "alternate", "n_g": 3},
    )
    return spec


def write_spec(spec: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
