#!/usr/bin/env bash
# The GPU check of this project, a first-GPU acceptance run: one script, at most 10 minutes on a machine with one
# CUDA GPU, Python 3.12 and torch, no package registry; with more GPUs it runs more checks. It
#   1. installs megatron-core 0.19.x (and any other missing dependency) from local wheel files in $WHEELS,
#   2. runs the backend tests on CUDA/NCCL in a world of one (multi-process tests deselected; all run, no -x),
#   3. checks that the loss of a training step of a 4-layer Qwen3 in bf16 on the GPU equals the fp32 CPU loss of
#      the same step within bf16 tolerance (the step before and the one after the optimizer update),
#   4. runs `camopd plan` of the flagship spec (its memory terms and the rollout-time estimate of both engines),
#   5. samples rollouts on CUDA at temperature 1 with the KV-cached and the reference engine (same tokens),
#   6. trains the tiny spec rollout -> train -> rollout in bf16 with full recompute (RoPE) and checks
#      train_rollout_lp_absdiff of every step against a bound (a rollout after a step samples with its weights),
#   7. the same with the TransformerEngine layer spec and FP8 (delayed scaling) when TE is present (else SKIP,
#      with the reason),
#   8. NCCL tensor parallelism: TP = 2 (with 2 GPUs) and TP = 2 x PP = 2 (with 4 GPUs) training steps,
#   9. a distributed-optimizer save and a resume from it (DP = 2 with 2 GPUs),
#  10. a one-step-off async pipeline run (rollout.max_staleness: 1, the generating thread on the rank's GPU),
#  11. the benchmarks (tools/bench_step.py, tools/bench_rollout.py, tools/bench_overlap.py), shortened,
# never stopping at a failure, and prints one summary (PASS/FAIL/SKIP per check, with seconds and a detail);
# exit status 1 when a check failed.
#
#   bash tools/gpu_check.sh                   run the check (in the repository root)
#   bash tools/gpu_check.sh --prepare         on a machine WITH a registry: download the wheels into $WHEELS
#
# Environment: WHEELS (default .gpu_wheels; must hold megatron_core-0.19.*.whl), OUT (logs and plan.json; default
# a temporary directory), BUDGET_S (default 570; 1500 with DRY_RUN: checks that would start later are skipped),
# SKIP (check names to skip, e.g. "backend-tests bench-overlap"), DRY_RUN=1 (the script's own test on a machine
# without a GPU, run by tests/misc/test_gpu_check_dry_run.py: no CUDA and the installed megatron-core are
# accepted, every check runs on the CPU -- the "GPU" runs in bf16 there, the multi-GPU ones on gloo ranks -- but
# the TransformerEngine/FP8 one, which needs CUDA).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=${WHEELS:-$REPO/.gpu_wheels}
OUT=${OUT:-$(mktemp -d)}
if [[ ${DRY_RUN:-} == 1 ]]; then BUDGET_S=${BUDGET_S:-1500}; else BUDGET_S=${BUDGET_S:-570}; fi  # 10 min less setup
PY=${PYTHON:-python3}
# runtime dependencies besides torch and transformers (present on the GPU machine); megatron-core without deps
DEPS=(pyyaml submitit psutil safetensors tokenizers aiohttp tqdm scipy pyarrow pytest pytest-timeout hypothesis)

if [[ ${1:-} == --prepare ]]; then
  mkdir -p "$WHEELS"
  grep -qxF "/$(basename "$WHEELS")/" .git/info/exclude 2>/dev/null || echo "/$(basename "$WHEELS")/" >>.git/info/exclude
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" "megatron-core>=0.19,<0.20" "${DEPS[@]}" || exit 1
  ls -1 "$WHEELS"
  exit 0
fi

mkdir -p "$OUT"
SUMMARY=()
FAILED=0
record() {  # STATUS NAME START DETAIL
  local line
  line=$(printf '%-4s %-34s %4ds  %s' "$1" "$2" $((SECONDS - $3)) "$4")
  SUMMARY+=("$line")
  echo "== $line"
  if [[ $1 == FAIL ]]; then FAILED=1; fi
}
run_check() {  # NAME TIMEOUT_S COMMAND...: run with a timeout, log to $OUT/<name>.log, record the result
  local name=$1 limit=$2 start=$SECONDS rc=0 log
  shift 2
  log="$OUT/$name.log"
  if [[ " ${SKIP:-} " == *" $name "* ]]; then record SKIP "$name" "$start" "SKIP"; return 0; fi
  if ((SECONDS + 10 > BUDGET_S)); then record SKIP "$name" "$start" "over the ${BUDGET_S}s budget"; return 0; fi
  ((limit > BUDGET_S - SECONDS)) && limit=$((BUDGET_S - SECONDS))
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  tail -n 5 "$log"
  if ((rc == 0)); then
    record PASS "$name" "$start" "$(grep -E "$DETAIL_RE" "$log" | tail -n1 | cut -c1-90)"
  elif ((rc == 124 || rc == 137)); then
    record FAIL "$name" "$start" "timed out after ${limit}s (log: $log)"
  else
    record FAIL "$name" "$start" "rc=$rc (log: $log)"
  fi
}
DETAIL_RE='passed|loss|total|ratio|tokens/s|x |step|rows equal'
skip_check() {  # NAME REASON
  record SKIP "$1" "$SECONDS" "$2"
}

# ---- 0. the machine -----------------------------------------------------------------------------------------------
start=$SECONDS
info=$("$PY" - <<'EOF' 2>&1
import importlib.util, sys
import torch
ok = torch.cuda.is_available()
name = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if ok else "no CUDA device"
try:
    from importlib.metadata import version
    te = f"TransformerEngine {version('transformer_engine')}" if importlib.util.find_spec("transformer_engine") else ""
except Exception:  # the module without its distribution metadata
    te = "TransformerEngine (version unknown)"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {name}, {te or 'TransformerEngine absent'}")
sys.exit(0 if ok else 3)
EOF
)
rc=$?
case $rc in
  0) if [[ $info == "python 3.12."* ]]; then record PASS machine "$start" "$info"; else
       record FAIL machine "$start" "needs Python 3.12: $info"; fi ;;
  3) if [[ ${DRY_RUN:-} == 1 ]]; then record SKIP machine "$start" "DRY_RUN: $info"; else
       record FAIL machine "$start" "$info"; printf '%s\n' "${SUMMARY[@]}"; exit 1; fi ;;
  *) record FAIL machine "$start" "$info"; printf '%s\n' "${SUMMARY[@]}"; exit 1 ;;
esac

# ---- 1. megatron-core 0.19.x from a local wheel -------------------------------------------------------------------
start=$SECONDS
SITE=$OUT/site  # the wheels go here (pip --target), first on PYTHONPATH: the machine's Python stays untouched
VPY=$PY
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
wheel=$(ls -1 "$WHEELS"/megatron_core-0.19*.whl 2>/dev/null | head -n1)
if [[ -z $wheel && ${DRY_RUN:-} == 1 ]]; then
  record SKIP megatron-core "$start" "DRY_RUN: the installed one"
elif [[ -z $wheel ]]; then
  record FAIL megatron-core "$start" "no megatron_core-0.19*.whl in $WHEELS (bash tools/gpu_check.sh --prepare)"
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
else
{
  "$PY" -m pip install --no-index --no-deps --target "$SITE" "$wheel"
  for dep in "${DEPS[@]}"; do  # only what the machine lacks, from the same folder
    mod=${dep//-/_}
    mod=${mod/pyyaml/yaml}
    "$PY" -c "import $mod" 2>/dev/null ||
      "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" --target "$SITE" "$dep"
  done
} >"$OUT/setup.log" 2>&1
version=$("$PY" -c 'import megatron.core as m; print(m.__version__)' 2>>"$OUT/setup.log")
if [[ $version == 0.19.* ]]; then record PASS megatron-core "$start" "megatron-core $version from $(basename "$wheel")"
else record FAIL megatron-core "$start" "got '${version:-nothing}' (see $OUT/setup.log)"; fi
fi

# what the checks below need to know of the machine
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
HAVE_TE=$("$PY" -c 'import importlib.util as u, torch
print(int(torch.cuda.is_available() and u.find_spec("transformer_engine") is not None))' 2>/dev/null || echo 0)
if [[ ${DRY_RUN:-} == 1 && $NGPU == 0 ]]; then RANKS=4; else RANKS=$NGPU; fi  # DRY_RUN: gloo ranks on the CPU
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # several ranks share the CPU cores (the GPUs do the work)

# ---- 2. backend tests, CUDA/NCCL, world of one --------------------------------------------------------------------
run_check backend-tests 170 "$VPY" -m pytest -q -p no:cacheprovider tests/backend -m "not multiproc" \
  -k "not multirank and not spawn"

# ---- 3. a 4-layer Qwen3 step: GPU bf16 loss == CPU fp32 loss ------------------------------------------------------
cat >"$OUT/step_loss.py" <<'PYEOF'
"""One SFT training step (and the loss after it) of a seeded 4-layer Qwen3 on a fixed batch; prints JSON."""
import json, sys
from pathlib import Path

import torch

device, model_dir = sys.argv[1], Path(sys.argv[2])
if not (model_dir / "config.json").exists():
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=False, rope_theta=1e6)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(model_dir)

from megatron_camopd.backend.cpu_runtime import init_distributed
from megatron_camopd.backend.engine import Engine, OptimSettings
from megatron_camopd.backend.loss import LossSpec
from megatron_camopd.loop.session import ModelSource

init_distributed(1, 1, seed=1)
source = ModelSource.resolve(str(model_dir), None, "model")  # what `camopd train` loads the student with
arch = source.arch()
dtype = "bf16" if device == "gpu" else "fp32"
engine = Engine(arch, dtype=dtype, micro_batch_size=2, optim=OptimSettings(lr=1e-3, total_steps=2),
                init_fn=lambda chunks: source.load_into(chunks, arch))
g = torch.Generator().manual_seed(0)
n, width = 4, 96
tokens = torch.randint(0, 512, (n, width), generator=g)
labels = torch.roll(tokens, -1, 1)
batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(n, width), "sample_weight": torch.ones(n),
         "rollout_lp": torch.zeros(n, width), "advantages": torch.zeros(n, width),
         "token_weight": torch.ones(n, width), "seq_len": torch.full((n,), width)}
batch["loss_mask"][:, -1] = 0
first = engine.train_step(batch, LossSpec(loss="sft"))
second = engine.train_step(batch, LossSpec(loss="sft"))
print(json.dumps({"device": device, "dtype": dtype, "loss": first["loss"], "loss_after_step": second["loss"],
                  "grad_norm": first["grad_norm"]}))
PYEOF
cat >"$OUT/compare_loss.sh" <<SHEOF
set -e
CUDA_VISIBLE_DEVICES= "$VPY" "$OUT/step_loss.py" cpu "$OUT/qwen3_4layer" | tail -n1 >"$OUT/loss_cpu.json"
"$VPY" "$OUT/step_loss.py" gpu "$OUT/qwen3_4layer" | tail -n1 >"$OUT/loss_gpu.json"  # DRY_RUN: CPU bf16
"$VPY" - "$OUT/loss_cpu.json" "$OUT/loss_gpu.json" <<'PY'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:])
ok = True
for key in ("loss", "loss_after_step"):
    rel = abs(gpu[key] - cpu[key]) / abs(cpu[key])
    ok &= rel < 1e-2  # bf16 keeps 8 significant bits (3.9e-3); measured on CPU: bf16 vs fp32 ~1e-4
    print(f"{key}: cpu fp32 {cpu[key]:.5f}, gpu bf16 {gpu[key]:.5f}, relative difference {rel:.2e}")
sys.exit(0 if ok else 1)
PY
SHEOF
run_check qwen3-step-loss 90 bash "$OUT/compare_loss.sh"

# ---- 4. camopd plan of the flagship spec ---------------------------------------------------------------------------
cat >"$OUT/plan.sh" <<SHEOF
"$VPY" -m megatron_camopd.cli plan yaml/camopd_medical_qwen3_8b.yaml --json >"$OUT/plan.json" || exit 1
"$VPY" - "$OUT/plan.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))
tc, mem, est = plan["transformer_config"], plan["memory_gb_per_gpu"], plan["rollout_time_s"]
print(f"sequence_parallel={tc['sequence_parallel']} recompute_granularity={tc['recompute_granularity']} "
      f"fp8={tc['fp8']}; total {mem['total']} GB of {mem['gpu_memory_gb']}; rollout ~{est['megatron']['seconds']} s "
      f"in process, ~{est['sglang']['seconds']} s on SGLang; {len(plan['slurm']['components'])} Slurm components")
ok = (tc["sequence_parallel"], tc["recompute_granularity"], tc["fp8"]) == (True, "full", "hybrid")
ok &= {"rollout_snapshot", "rollout_weight_clones", "rollout_kv_cache"} <= set(mem["terms"])
ok &= est["engine"] == "sglang" and est["megatron"]["seconds"] > 0 and est["sglang"]["seconds"] > 0
sys.exit(0 if ok else 1)
PY
SHEOF
run_check camopd-plan 40 bash "$OUT/plan.sh"

# ---- 5. sampled rollouts on CUDA -----------------------------------------------------------------------------------
run_check sampled-rollout 60 "$VPY" tools/gpu_checks.py sampled-rollout

# ---- 6-10. the tiny spec trained: rollout -> train -> rollout, FP8, TP/PP over NCCL, distributed optimizer, async
"$VPY" tools/gpu_checks.py tiny "$OUT/tiny" >"$OUT/tiny.overrides" 2>"$OUT/tiny.log" || echo "tiny setup failed: $OUT/tiny.log"
cat >"$OUT/train_tiny.sh" <<SHEOF
# RANKS CKPT_DIR OVERRIDES...: camopd train of the tiny spec on RANKS processes (torchrun beyond one)
set -e
ranks=\$1 dir=\$2
shift 2
mapfile -t tiny <"$OUT/tiny.overrides"
if ((ranks > 1)); then cmd=("$VPY" -m torch.distributed.run --standalone --nproc-per-node="\$ranks" -m megatron_camopd.cli)
else cmd=("$VPY" -m megatron_camopd.cli); fi
"\${cmd[@]}" train yaml/examples/camopd_tiny_cpu.yaml "\${tiny[@]}" "checkpoint.dir=\$dir" logging.progress=lines \\
  logging.diagnostics=false rollout.max_new_tokens=16 train.lr=1e-2 "\$@"
SHEOF
TRAIN="bash $OUT/train_tiny.sh"
METRICS="$VPY tools/gpu_checks.py metrics"
# bf16 rounding of the trainer's and the rollout's log-probs stays far below this bound; a rollout sampled with
# the previous step's weights (lr 1e-2) is far above it (the async check's one-step-old rollouts show how far)
LP_BOUND=0.02
train_check() {  # NAME TIMEOUT RANKS METRICS_ARGS... -- OVERRIDES...
  local name=$1 limit=$2 ranks=$3 margs=()
  shift 3
  while [[ $1 != -- ]]; do margs+=("$1"); shift; done
  shift
  printf 'set -e\n%s %s %q %s\n%s %q %s\n' "$TRAIN" "$ranks" "$OUT/$name" "$*" "$METRICS" "$OUT/$name" \
    "${margs[*]}" >"$OUT/$name.sh"
  run_check "$name" "$limit" bash "$OUT/$name.sh"
}
train_check rollout-train-rollout 90 1 --steps 3 --max-lp-absdiff $LP_BOUND -- \
  model.dtype=bf16 parallel.recompute=full train.steps=3
if ((HAVE_TE)); then
  train_check te-fp8 120 1 --steps 3 --max-lp-absdiff 0.1 -- \
    model.dtype=bf16 parallel.recompute=full parallel.fp8.enabled=true parallel.fp8.recipe=delayed train.steps=3
else skip_check te-fp8 "TransformerEngine is not installed (or no CUDA): the local layer spec ran, FP8 untested"; fi
if ((RANKS >= 2)); then
  train_check tp2 120 2 --steps 2 --max-lp-absdiff $LP_BOUND -- \
    model.dtype=bf16 parallel.tp=2 parallel.sequence_parallel=true train.steps=2
else skip_check tp2 "needs 2 GPUs, found $NGPU"; fi
if ((RANKS >= 4)); then
  train_check tp2-pp2 150 4 --steps 2 --max-lp-absdiff $LP_BOUND -- \
    model.dtype=bf16 parallel.tp=2 parallel.pp=2 train.steps=2
else skip_check tp2-pp2 "needs 4 GPUs, found $NGPU"; fi
dp=$((RANKS >= 2 ? 2 : 1))
distopt="model.dtype=bf16 train.distributed_optimizer=true checkpoint.save_interval=1 train.micro_batch_size=2"
# megatron-core's distributed optimizer loads only with TransformerEngine or Apex (refused plainly without)
# saved as dp_reshardable (the flagship's format), resumed with the default fully_reshardable: the load reads the
# format the checkpoint records, step 3's save writes the other one
LOADS=$("$VPY" -c 'from megatron.core.optimizer import distrib_optimizer as d; print(int(d.HAVE_APEX_OR_TE))' \
  2>/dev/null || echo 0)
if ((LOADS)); then
  resume="$TRAIN $dp $OUT/distopt $distopt train.steps=3 2>&1 | tee $OUT/distopt/resumed.log
test \${PIPESTATUS[0]} = 0
$METRICS $OUT/distopt --steps 3 --resumed-at 2 --max-lp-absdiff $LP_BOUND
echo 'distributed optimizer at DP=$dp: saved at steps 1 and 2, resumed at step 2, step 3 trained'"
else
  resume="$METRICS $OUT/distopt --steps 2 --checkpoint-step 2
echo 'distributed optimizer at DP=$dp: saved at steps 1 and 2 (verified); no resume: it needs TE or Apex'"
fi
cat >"$OUT/distopt.sh" <<SHEOF
set -e
$TRAIN $dp "$OUT/distopt" $distopt train.steps=2 checkpoint.optimizer_format=dp_reshardable
$resume
SHEOF
run_check distopt-save-load 150 bash "$OUT/distopt.sh"
train_check async-pipeline 90 1 --steps 3 --staleness 1 -- model.dtype=bf16 rollout.max_staleness=1 train.steps=3

# ---- 11. benchmarks (shortened) -----------------------------------------------------------------------------------
# (DRY_RUN: smaller, so that the CPU runs them in the suite's time; their numbers come from a GPU run)
if ((NGPU > 0)); then rollout_args=(--lengths 64,256 --batch 16 --reference-up-to 64); overlap_limit=60
else rollout_args=(--lengths 16,64 --batch 4 --hidden 128 --reference-up-to 16); overlap_limit=150; fi
run_check bench-step 60 "$VPY" tools/bench_step.py --repeats 5
run_check bench-rollout 60 "$VPY" tools/bench_rollout.py "${rollout_args[@]}" --repeats 1
run_check bench-overlap $overlap_limit "$VPY" tools/bench_overlap.py --steps 2 --prompts 4 --max-new-tokens 8 \
  --out "$OUT/overlap"

# ---- summary -------------------------------------------------------------------------------------------------------
echo
echo "GPU check summary (${SECONDS}s; logs in $OUT):"
printf '  %s\n' "${SUMMARY[@]}"
exit "$FAILED"
