"""Method registry: turn a rollout batch's rollout-time signals into training signals.

Every method sees a :class:`SignalBatch` (teacher/rollout log-probs and optional extras, padded ``[B, T]`` with a
``mask``) and returns :class:`TrainSignals` (advantages, token weights, sample selection, metrics) that the Megatron
loss consumes. The token gap is ``delta = teacher_lp - rollout_lp``: the student's log-probs *at rollout time*
(``mu``), so signals are fixed before the update and the train-time mismatch is handled by the IS weight
(``is_weight``, see ``weights.py``) inside the loss. A sample with a non-finite teacher/rollout (or other required)
log-prob on a response token is dropped (``sample_weight = 0``), counted in ``metrics["n_nan_dropped"]``, and its
values are zeroed so NaN never reaches an advantage. Empty rows are dropped too (``n_empty``).
Loss forms: ``"pg"`` uses ``advantages * token_weight``; ``"topk"`` uses ``topk_seq_loss * seq_scale``; both
reduce with ``reduce_selected(..., sample_weight)``. ``SignalBatch``/``TrainSignals`` live in ``signals.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from megatron_camopd.algo import baselines, uniopd
from megatron_camopd.algo.baselines import ExOPDParams, RelaxedParams, SelecTKDParams
from megatron_camopd.algo.camopd import BRANCHES, CaMOPDParams, branch_scale, gap_scores, mass_target_select
from megatron_camopd.algo.diagnostics import length_summary, selected_fraction, spearman
from megatron_camopd.algo.losses import clip_advantage
from megatron_camopd.algo.params import LossParams, MethodParams
from megatron_camopd.algo.signals import SignalBatch, TrainSignals
from megatron_camopd.algo.tokens import as_bool_mask, masked_seq_mean, nonfinite_rows, seq_lengths
from megatron_camopd.algo.uniopd import UniOPDParams
from megatron_camopd.checks import FieldError, check
from megatron_camopd.errors import DataError, SpecError


@dataclass
class _Prepared:
    """Cleaned batch: NaN rows dropped, values zeroed off valid response tokens."""

    m: Tensor  # bool [B, T], response tokens of valid rows only
    valid: Tensor  # bool [B]
    delta: Tensor  # [B, T]
    alpha: Tensor  # [B]
    lengths: Tensor  # [B]
    metrics: dict[str, float]


def _rows(branch: list[str], name: str, device: torch.device) -> Tensor:
    return torch.tensor([x == name for x in branch], dtype=torch.bool, device=device)


def _branch_score(delta: Tensor, mask: Tensor, branch: str) -> Tensor:
    return gap_scores(delta, mask, branch) if branch in BRANCHES else masked_seq_mean(delta.abs(), mask)


@dataclass
class Method(LossParams, MethodParams):
    """Base: shared loss settings (``params.LossParams``: advantage clip, IS weights, loss form), cleaning, common
    metrics.

    A method declares what it asks of the loop in class attributes and hooks; the session, the rollout collector,
    the launcher and the spec's validation read them. A new method is one class (deriving from its parameters'
    ``MethodParams`` section too when it has parameters of its own, defined next to its maths) registered with
    :func:`register_method`, which names where the spec's `method` section holds those parameters.
    """

    name: ClassVar[str] = ""
    loss_forms: ClassVar[tuple[str, ...]] = ("pg",)
    on_policy: ClassVar[bool] = True  # trains on its own rollouts (SFT: on the streams' responses)
    needs_teachers: ClassVar[bool] = True  # the teachers score every rollout token
    needs_reference: ClassVar[bool] = False  # a frozen reference model scores them too (ExOPD)
    needs_both_branches: ClassVar[bool] = False  # general and domain streams (CaMOPD's decoupled branches)
    default_schedule: ClassVar[str] = "mixed"  # `schedule.mode` when the spec leaves it out
    default_n_samples: ClassVar[int] = 1  # `rollout.n_samples` when the spec leaves it out
    default_selection: ClassVar[bool] = False  # `method.selection` when the spec leaves it out

    def __post_init__(self) -> None:
        super().__post_init__()  # the fields' types, then every parameter section's validate()
        self.resolve(type(self))

    def validate(self) -> None:
        super().validate()
        self.check_loss(self.loss)

    @classmethod
    def check_loss(cls, loss: str) -> None:
        """`method.loss` must be one of the loss forms this method trains with."""
        check(
            loss in cls.loss_forms,
            "loss",
            f"{cls.name} trains with loss {' or '.join(map(repr, cls.loss_forms))}, got {loss!r}",
        )

    @classmethod
    def reference_path(cls, cfg: Any) -> str | None:
        """Where the frozen reference model of a `needs_reference` method is (None: the initial student)."""
        return None

    @classmethod
    def needs_outcome_groups(cls, cfg: Any) -> bool:
        """Whether the spec's `method` section asks for groups of rollouts scored by outcome verifiers
        (rollout.n_samples >= 2 and a verifier on every stream; Uni-OPD's calibration and balancing)."""
        return False

    @classmethod
    def loss_kind(cls, loss: str) -> str:
        """The Megatron loss it trains with (backend/loss.py LossSpec.loss), given the spec's `method.loss`."""
        return loss

    def without_selection(self) -> Method:
        """The same method keeping every candidate sample (the diagnostics' full batch); itself if it selects none."""
        return self

    @property
    def student_top1_k(self) -> int | None:
        """Teacher top-k width the student's top-1 is checked against (its ids must travel with a sample)."""
        return None

    def balances_streams(self) -> bool:
        """Whether the streams are rebalanced by an offline pass before training (Uni-OPD's offline balancing)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (resume is bitwise); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def required(self, batch: SignalBatch | None) -> list[str]:
        """Optional batch fields this method needs (missing -> DataError; non-finite on a token -> drop)."""
        return ["teacher_topk_lp", "teacher_topk_ids"] if self.loss == "topk" else []

    def prepare(self, batch: SignalBatch) -> TrainSignals:
        """Compute the training signals of ``batch``."""
        prep = self._clean(batch)
        adv, tw, keep, scale = self._signals(batch, prep)
        sw = prep.valid & keep
        m = prep.m & sw.unsqueeze(-1)
        adv = torch.where(m, torch.nan_to_num(adv.detach(), nan=0.0, posinf=0.0, neginf=0.0), torch.zeros_like(adv))
        tw = torch.where(m, tw, torch.zeros_like(tw))
        prep.metrics["selected_fraction"] = selected_fraction(sw)
        return TrainSignals(adv.float(), tw.float(), sw.float(), prep.metrics, scale.float() * sw.float())

    def _signals(self, batch: SignalBatch, p: _Prepared) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(advantages, token_weight, keep [B] bool, seq_scale [B]); overridden per method."""
        adv = clip_advantage(p.delta, self.a_max) * p.alpha.unsqueeze(-1)
        return adv, p.m.float(), torch.ones_like(p.valid), p.alpha.clone()

    def _clean(self, batch: SignalBatch) -> _Prepared:
        for name in self.required(batch):
            if getattr(batch, name) is None:
                raise DataError(f"{self.name}: batch field {name!r} is required")
        mask = as_bool_mask(batch.mask)
        checked = [batch.teacher_lp, batch.rollout_lp] + [
            getattr(batch, n) for n in self.required(batch) if getattr(batch, n).is_floating_point()
        ]
        bad = nonfinite_rows(mask, *checked)
        lengths = seq_lengths(mask)
        valid = ~bad & (lengths > 0)
        m = mask & valid.unsqueeze(-1)
        dev = mask.device
        zero = torch.zeros((), dtype=batch.teacher_lp.dtype, device=dev)
        delta = torch.where(m, batch.teacher_lp - batch.rollout_lp, zero).float()
        tw = batch.teacher_weight
        alpha = torch.ones(mask.shape[0], device=dev) if tw is None else tw.float()
        n_tok = max(int(m.sum()), 1)
        metrics: dict[str, float] = {
            "n_samples": float(mask.shape[0]),
            "n_nan_dropped": float(bad.sum()),
            "n_empty": float(((lengths == 0) & ~bad).sum()),
            "mean_gap": float(delta.sum()) / n_tok,
            "reverse_kl": float(-delta.sum()) / n_tok,
            "mean_abs_gap": float(delta.abs().sum()) / n_tok,
        }
        if batch.entropy is not None:
            ent = torch.where(m, torch.nan_to_num(batch.entropy.float()), 0.0)
            metrics["entropy"] = float(ent.sum()) / n_tok
        for b in sorted(set(batch.branch)):
            rows = _rows(batch.branch, b, dev) & valid
            scores = _branch_score(delta, m, b)
            metrics[f"mean_gap/{b}"] = float(delta[rows].sum()) / max(int(m[rows].sum()), 1)
            metrics[f"spearman_gap_len/{b}"] = spearman(scores[rows], lengths[rows].double())
        return _Prepared(m, valid, delta, alpha, lengths, metrics)


@dataclass
class OPD(Method):
    """Single-teacher on-policy distillation: ``A = clip(delta)``."""

    name: ClassVar[str] = "opd"
    loss_forms: ClassVar[tuple[str, ...]] = ("pg", "topk")


@dataclass
class MOPD(OPD):
    """Vanilla multi-teacher OPD: every sample routed to its domain's teacher, branches mixed, no selection."""

    name: ClassVar[str] = "mopd"


@dataclass
class CaMOPD(Method, CaMOPDParams):
    """CaMOPD: per-branch mass-target selection on gap scores and branch scales ``r_b`` (arXiv:2605.27115 §3.3, Eqs.
    (6)-(9))."""

    name: ClassVar[str] = "camopd"
    loss_forms: ClassVar[tuple[str, ...]] = ("pg", "topk")
    needs_both_branches: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "alternate"
    default_selection: ClassVar[bool] = True
    # selection_order "random" (the ablation that separates "which samples" from "how many") is seeded by `seed`
    # (`train.seed`) and a per-batch counter, checkpointed
    seed: int = 0
    _calls: int = field(default=0, init=False, repr=False)

    def without_selection(self) -> CaMOPD:
        """The same method keeping every candidate (the diagnostics' full batch)."""
        return dataclasses.replace(self, selection=False)

    def state_dict(self) -> dict[str, Any]:
        """Random selection's RNG position (gap selection has no state)."""
        return {"calls": self._calls} if self.selection_order == "random" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._calls = int(state.get("calls", 0))

    def _random_keep(self, k: int, valid: Tensor, n: int, branch: str) -> Tensor:
        """k of the `valid` positions (finite gap scores) of n, at random: a fresh generator per batch and branch
        (seed, the batch counter, the branch), so a run is reproducible and resumes on the same draws."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self._calls) * 2 + BRANCHES.index(branch))
        keep = torch.zeros(n, dtype=torch.bool)
        valid = valid.cpu()
        keep[valid[torch.randperm(valid.numel(), generator=gen)[:k]]] = True
        return keep

    def _signals(self, batch: SignalBatch, p: _Prepared) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        unknown = sorted(set(batch.branch) - set(BRANCHES))
        if unknown:
            raise DataError(f"camopd: branch must be one of {BRANCHES}, got {unknown}")
        keep = torch.zeros_like(p.valid)
        scale = torch.zeros_like(p.alpha)
        for b in sorted(set(batch.branch)):
            rows = _rows(batch.branch, b, p.valid.device)
            idx = torch.nonzero(rows & p.valid).flatten()
            r_b = branch_scale(b, self.r_g, self.r_d)
            scale[rows] = r_b
            if idx.numel() == 0:
                p.metrics[f"selected_fraction/{b}"] = 0.0
                continue
            if self.selection:
                rho = self.rho_g if b == "general" else self.rho_d
                res = mass_target_select(gap_scores(p.delta[idx], p.m[idx], b), rho)
                sel = res.keep
                if self.selection_order == "random":  # as many samples as the gap prefix, drawn at random
                    sel = self._random_keep(int(sel.sum()), res.order, idx.numel(), b).to(sel.device)
                p.metrics[f"all_zero/{b}"] = float(res.all_zero)
            else:
                sel = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
            keep[idx[sel]] = True
            p.metrics[f"selected_fraction/{b}"] = float(sel.sum()) / int(rows.sum())
            for k, v in length_summary(p.lengths[idx], sel).items():
                p.metrics[f"{k}/{b}"] = v
        if self.selection and self.selection_order == "random":
            self._calls += 1
        scale = scale * p.alpha
        adv = clip_advantage(p.delta, self.a_max) * scale.unsqueeze(-1)
        return adv, p.m.float(), keep, scale


@dataclass
class UniOPD(Method, UniOPDParams):
    """Uni-OPD: online correctness balancing + outcome-guided margin calibration (Uni-OPD §3.3-§3.4)."""

    name: ClassVar[str] = "uniopd"
    default_n_samples: ClassVar[int] = 16
    seed: int = 0  # `train.seed`: the online balancing's draws
    advantage: Literal["token", "return"] = "token"  # token: shifted token rewards; return: G broadcast to every token
    _calls: int = field(default=0, init=False, repr=False)

    def balances_streams(self) -> bool:
        return self.offline_balance

    @classmethod
    def needs_outcome_groups(cls, cfg: Any) -> bool:
        return cfg.uniopd.calibration != "none" or cfg.uniopd.online_balance

    def required(self, batch: SignalBatch | None) -> list[str]:
        return ["reward", "group"]

    def state_dict(self) -> dict[str, int]:
        """Balancing RNG position (the generator is reseeded from ``seed`` and this counter each batch)."""
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._calls = int(state["calls"])

    def _signals(self, batch: SignalBatch, p: _Prepared) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert batch.reward is not None and batch.group is not None
        reward, group = batch.reward.float(), batch.group.long()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._calls)
        self._calls += 1
        keep = (
            uniopd.balance_correctness(reward, group, self.balance_ratio, gen, p.valid)
            if self.online_balance
            else p.valid
        )
        p.metrics["balance_dropped"] = float((p.valid & ~keep).sum())
        rewards = clip_advantage(p.delta, self.a_max) * p.alpha.unsqueeze(-1)
        before = uniopd.group_margins(
            uniopd.trajectory_returns(rewards, p.m), reward, group, self.margin_mode, self.scope, keep
        )
        if self.calibration == "shift":
            res = uniopd.margin_shift(
                rewards, p.m, reward, group, self.delta_star, self.shift, self.margin_mode, self.scope, keep
            )
            rewards = res.token_rewards
            p.metrics["groups_shifted"] = float((res.shift > 0).sum())
        elif self.calibration == "mask":
            g = uniopd.trajectory_returns(rewards, p.m)
            mkeep = uniopd.greedy_margin_mask(
                g, reward, group, self.delta_star, self.margin_mode, self.mask_min_frac, self.scope, keep
            )
            p.metrics["margin_masked"] = float((keep & ~mkeep).sum())
            keep = mkeep
        after = uniopd.group_margins(
            uniopd.trajectory_returns(rewards, p.m), reward, group, self.margin_mode, self.scope, keep
        )
        for key, gm in (("margin_before", before), ("margin_after", after)):
            defined = gm.margin[~torch.isnan(gm.margin)]
            p.metrics[key] = float(defined.mean()) if defined.numel() else math.nan
        if self.advantage == "return":
            rewards = uniopd.trajectory_returns(rewards, p.m).unsqueeze(-1).expand_as(rewards)
        return rewards, p.m.float(), keep, p.alpha.clone()


@dataclass
class RelaxedOPD(Method, RelaxedParams):
    """Relaxed OPD (REOPOLD): reward floor ``log(lam/(1-lam))`` and top-``beta`` entropy token sampling."""

    name: ClassVar[str] = "relaxed_opd"

    def required(self, batch: SignalBatch | None) -> list[str]:
        return ["entropy"]

    def _signals(self, batch: SignalBatch, p: _Prepared) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert batch.entropy is not None
        adv = clip_advantage(baselines.relaxed_reward(p.delta, self.lam), self.a_max) * p.alpha.unsqueeze(-1)
        tw = baselines.entropy_token_mask(batch.entropy.float(), p.m, self.beta)
        p.metrics["entropy_kept_fraction"] = float(tw.sum()) / max(int(p.m.sum()), 1)
        return adv, tw, torch.ones_like(p.valid), p.alpha.clone()


@dataclass
class SelecTKD(Method, SelecTKDParams):
    """SelecTKD: tokens whose student top-1 is outside the teacher's top-``k`` weigh ``beta``."""

    name: ClassVar[str] = "selectkd"

    @property
    def student_top1_k(self) -> int | None:
        return self.k

    def required(self, batch: SignalBatch | None) -> list[str]:
        return ["student_top1", "teacher_topk_ids"]

    def _signals(self, batch: SignalBatch, p: _Prepared) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert batch.student_top1 is not None and batch.teacher_topk_ids is not None
        tw, rate = baselines.selectkd_weights(batch.student_top1, batch.teacher_topk_ids, p.m, self.k, self.beta)
        p.metrics["acceptance_rate"] = rate
        adv = clip_advantage(p.delta, self.a_max) * p.alpha.unsqueeze(-1)
        return adv, tw, torch.ones_like(p.valid), p.alpha.clone()


@dataclass
class ExOPD(Method, ExOPDParams):
    """ExOPD (G-OPD): ``A = lam (lp_T - lp_ref) - (lp_s - lp_ref)`` with the frozen initial student as ref."""

    name: ClassVar[str] = "exopd"
    needs_reference: ClassVar[bool] = True

    @classmethod
    def reference_path(cls, cfg: Any) -> str | None:
        return cfg.exopd.reference

    def required(self, batch: SignalBatch | None) -> list[str]:
        return ["ref_lp"]

    def _signals(self, batch: SignalBatch, p: _Prepared) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert batch.ref_lp is not None
        zero = torch.zeros((), device=p.m.device)
        t, s, r = (torch.where(p.m, x.float(), zero) for x in (batch.teacher_lp, batch.rollout_lp, batch.ref_lp))
        adv = clip_advantage(baselines.exopd_advantage(t, s, r, p.m, self.lam), self.a_max) * p.alpha.unsqueeze(-1)
        return adv, p.m.float(), torch.ones_like(p.valid), p.alpha.clone()


@dataclass
class SFT(Method):
    """Supervised fine-tuning: response-only cross-entropy on the streams' reference responses (how the papers
    build their domain teachers). No rollouts and no teachers: the loop runs ``sft.py``'s step for it."""

    name: ClassVar[str] = "sft"
    on_policy: ClassVar[bool] = False
    needs_teachers: ClassVar[bool] = False

    @classmethod
    def loss_kind(cls, loss: str) -> str:
        return "sft"

    def prepare(self, batch: SignalBatch) -> TrainSignals:
        raise DataError("sft trains on reference responses; it has no rollout signals to prepare")


@dataclass(frozen=True)
class MethodRecord:
    """A registered method: its class, its own parameters' section and where the spec's `method` section has them."""

    cls: type[Method]
    params: type[MethodParams] | None  # None: the shared loss settings only
    key: str  # `method.<key>`; with `flat`, the name `spec.method.<key>` answers with those parameters
    flat: bool  # the parameters' fields sit in `method` itself (CaMOPD's `method.rho_g`)


METHODS: dict[str, MethodRecord] = {}
SHARED_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LossParams))


def register_method(
    cls: type[Method], params: type[MethodParams] | None = None, *, key: str | None = None, flat: bool = False
) -> type[Method]:
    """Add a method to the registry under its ``name`` (usable as a bare decorator); `method.name` selects it.

    ``params``: the section of its own parameters (``cls`` derives from it), loaded from `method.<key>` (``key``
    defaults to the name; ``flat``: from `method` itself). Their names may not clash with the shared loss
    settings' or another method's."""
    if not cls.name or cls.name in METHODS and METHODS[cls.name].cls is not cls:
        raise ValueError(f"method name {cls.name!r} is empty or taken by {METHODS.get(cls.name)}")
    rec = MethodRecord(cls, params, key or cls.name, flat)
    if params is not None:
        if not issubclass(cls, params):
            raise ValueError(f"method {cls.name!r}: {cls.__name__} must derive from its parameters {params.__name__}")
        own = [f.name for f in dataclasses.fields(params)]
        for f in dataclasses.fields(params):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"method {cls.name!r}: parameter {f.name!r} needs a default")
        taken = set(SHARED_FIELDS) | {"name"}
        for other in METHODS.values():
            if other.params is not None and other.cls is not cls:
                taken |= {other.key} | ({f.name for f in dataclasses.fields(other.params)} if other.flat else set())
        clash = sorted(taken & ({rec.key} | (set(own) if flat else set())))
        if clash:
            raise ValueError(f"method {cls.name!r}: `method.{clash[0]}` is already a spec key")
    METHODS[cls.name] = rec
    return cls


register_method(OPD)
register_method(MOPD)
register_method(CaMOPD, CaMOPDParams, flat=True)
register_method(UniOPD, UniOPDParams)
register_method(RelaxedOPD, RelaxedParams, key="relaxed")
register_method(SelecTKD, SelecTKDParams)
register_method(ExOPD, ExOPDParams)
register_method(SFT)


def method_record(name: str) -> MethodRecord:
    """The registry entry of `method.name` (a FieldError on `name` suggesting the closest name otherwise)."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), sorted(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(sorted(METHODS))}"
        raise FieldError("name", f"unknown method {name!r}{hint}")
    return METHODS[name]


def method_arguments(cfg: Any, seed: int = 0) -> dict[str, Any]:
    """The constructor arguments of the method the spec's `method` section selects: the shared loss settings, its
    own parameters (`method.<key>`), and `seed` (`train.seed`) when it draws at random."""
    rec = method_record(cfg.name)
    args = {f: getattr(cfg, f) for f in SHARED_FIELDS}
    if rec.params is not None:
        own = getattr(cfg, rec.key)
        args.update({f.name: getattr(own, f.name) for f in dataclasses.fields(rec.params)})
    if "seed" in {f.name for f in dataclasses.fields(rec.cls)}:
        args["seed"] = seed
    return args


def spec_method(spec: Any) -> Method:
    """The method an `ExperimentSpec` asks for, with its parameters."""
    return build_method(spec.method.name, **method_arguments(spec.method, spec.train.seed))


def build_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method; unknown names/parameters raise :class:`SpecError` naming them."""
    try:
        cls = method_record(name).cls
    except FieldError as err:
        raise SpecError(f"method.{err}") from None
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise SpecError(f"method.{unknown[0]}: unknown parameter for {name!r}; allowed: {sorted(allowed)}")
    return cls(**params)
