"""CaMOPD on the released SmolLM2-135M-Instruct, from the shipped spec `yaml/examples/smollm2_cpu.yaml` run by the
CLI: the student starts from the `convert --from-hf` checkpoint, both teachers are SmolLM2 (in process, and
served by one `camopd serve` replica over real HTTP); two steps (general, then domain) each way. The trained
checkpoint converts back with `--to-hf`, and transformers loads and generates with it.

The teachers equal the student's starting weights, so the first step's gap is zero up to float noise: the
teachers' log-probs of the student's real sampled tokens (ChatML prompt, 49k vocab, tokenizer-fingerprint check)
line up with the student's own, in process and over HTTP.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from megatron_camopd.config import load_spec
from megatron_camopd.convert.main import convert_main
from megatron_camopd.serve.server import start_local_replicas

from .conftest import CHAT, EXAMPLE_SPEC, metrics, run_camopd, sub_env

pytestmark = [pytest.mark.realmodel, pytest.mark.multiproc, pytest.mark.timeout(900)]
STEPS = 2


def _overrides(ckpt: Path, out: Path, teachers: list[str]) -> list[str]:
    return [
        f"model.checkpoint={ckpt}",
        f"checkpoint.dir={out}",
        f"train.steps={STEPS}",
        "checkpoint.resume=never",
        "logging.progress=off",
        *teachers,
    ]


@pytest.fixture(scope="module")
def runs(smollm2_dir, smollm2_ckpt, tmp_path_factory) -> dict[str, Path]:
    """The example spec trained twice, 2 steps each, in parallel: teachers in process, and teachers served."""
    root = tmp_path_factory.mktemp("smollm2_train")
    (rep,) = start_local_replicas(smollm2_dir, root, 1, env=sub_env())
    try:
        local = [f"teachers.{n}.hf_path={smollm2_dir}" for n in ("general", "domain")]
        served = [
            x for n in ("general", "domain") for x in (f"teachers.{n}.hf_path=null", f"teachers.{n}.urls=[{rep.url}]")
        ]
        jobs = {
            "local": _overrides(smollm2_ckpt, root / "local", local),
            "served": _overrides(smollm2_ckpt, root / "served", served),
        }
        for over in jobs.values():  # bad overrides fail here, before any process starts
            load_spec(EXAMPLE_SPEC, over)
        errors: dict[str, BaseException] = {}
        times: dict[str, float] = {}

        def run(name: str) -> None:
            try:
                times[name] = run_camopd(
                    "train", str(EXAMPLE_SPEC), *jobs[name], log=root / f"{name}.log", timeout_s=600
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors[name] = exc

        threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next(iter(errors.values()))
        print(f"SmolLM2 2-step trainings (in parallel): {', '.join(f'{k} {v:.0f} s' for k, v in times.items())}")
    finally:
        rep.stop()
    return {"local": root / "local", "served": root / "served", "root": root}


def test_smollm2_camopd_steps_with_inprocess_and_served_teachers(runs) -> None:
    local, served = metrics(runs["local"]), metrics(runs["served"])
    for rows in (local, served):
        assert [r["step"] for r in rows] == [1, 2] and [r["branch"] for r in rows] == ["general", "domain"]
        for r in rows:
            assert r["n_samples"] == 2 and r["teacher_failed"] == 0 and r["n_nan_dropped"] == 0, r
            assert r["response_len_mean"] > 0 and torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all()
        # teachers = the student's starting weights: the first step's gap is float noise, not a misalignment
        assert abs(rows[0]["mean_gap"]) < 1e-3 and rows[0]["mean_abs_gap"] < 1e-3, rows[0]
        assert rows[0]["train_rollout_lp_absdiff"] < 1e-3  # the trainer's log-probs = the sampler's
    for a, b in zip(local, served, strict=True):  # same seed, same rollouts: HTTP teachers score like in process
        assert abs(a["mean_gap"] - b["mean_gap"]) < 1e-5 and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    for d in ("local", "served"):
        assert (runs[d] / "latest").read_text().strip().endswith("2")  # the final checkpoint was written


def test_trained_smollm2_converts_back_and_generates(runs, smollm2_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_camopd.backend.hf_mapping import read_hf_state_dict

    hf = tmp_path / "hf"
    assert convert_main(["--to-hf", str(runs["local"]), str(hf)]) == 0
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > enc["input_ids"].shape[1] and text.strip(), repr(text)
    before, after = read_hf_state_dict(smollm2_dir), read_hf_state_dict(hf)
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the trained weights, not the release
