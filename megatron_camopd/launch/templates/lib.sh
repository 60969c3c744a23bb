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

serve_one() {  # NAME MODEL ADDR_FILE PORT FUNC: one server on this node (FUNC MODEL PORT READY execs it);
  # its host:port is registered in ADDR_FILE once /health answers
  local name=$1 model=$2 addr_file=$3 port=$4 func=$5 host server ready deadline rc
  host=$(hostname)
  ready="$addr_file.$host.$$.ready"
  if [[ $SERVER_BACKEND != sglang ]]; then port=""; fi  # CPU servers take a free port and write it to $ready
  "$func" "$model" "${port:-0}" "$ready" &
  server=$!
  trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit 0' TERM INT
  deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  while :; do
    if ! kill -0 "$server" 2>/dev/null; then
      rc=0; wait "$server" || rc=$?
      die "$name server on $host exited (rc=$rc) before it was healthy"
    fi
    if [[ -z $port && -s $ready ]]; then port=$(cut -d: -f2 <"$ready" | tr -d '[:space:]'); fi
    if [[ -n $port ]] && http_ok "http://$host:$port/health"; then break; fi
    if ((SECONDS >= deadline)); then
      kill -TERM "$server" 2>/dev/null || true
      die "$name server on $host not healthy after ${HEALTH_TIMEOUT_S}s"
    fi
    sleep 1
  done
  rm -f "$ready"
  register_address "$addr_file" "$host:$port"
  log "$name serves $model at $host:$port"
  rc=0; wait "$server" || rc=$?
  log "$name server on $host stopped (rc=$rc)"
  return "$rc"
}

SERVER_PIDS=()
declare -A WATCH_NAMES=()  # pid -> what it is (server srun steps, the health watchdog)

start_servers() {  # INDEX NAME MODEL NODES PORT WHAT SRUN_ARGS...: NODES servers of NAME in the background
  local i=$1 name=$2 model=$3 nodes=$4 port=$5 what=$6
  shift 6
  srun "$@" --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 bash -c 'serve_one "$@"' _ \
    "$name" "$model" "$DISCOVERY_DIR/$name.addr" "$port" "server_$i" &
  SERVER_PIDS+=($!)
  WATCH_NAMES[$!]=$what
}

wait_for_servers() {  # DIR ALIVE_CHECK: every server group lists its healthy replicas, or fail clearly
  local dir=$1 alive_check=$2 i name n deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  for i in "${!SERVERS[@]}"; do
    name=${SERVERS[$i]}
    while :; do
      n=$(healthy_count "$dir/$name.addr")
      ((n >= SERVER_NODES[i])) && break
      $alive_check || die "servers stopped before ${SERVER_LABELS[$i]} was healthy (see the log above)"
      ((SECONDS < deadline)) ||
        die "${SERVER_LABELS[$i]}: $n/${SERVER_NODES[$i]} healthy servers after ${HEALTH_TIMEOUT_S}s"
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

watch_servers() {  # DIR: exits once a server group has had no healthy server for TEACHER_DEAD_S (a watchdog job)
  local dir=$1 name since
  declare -A down=()
  while sleep "$WATCH_INTERVAL_S"; do
    for name in "${SERVERS[@]}"; do
      if (($(healthy_count "$dir/$name.addr") > 0)); then unset "down[$name]"; continue; fi
      since=${down[$name]:-$SECONDS}
      down[$name]=$since
      if ((SECONDS - since >= TEACHER_DEAD_S)); then
        log "ERROR: $name: no healthy server in $dir/$name.addr for ${TEACHER_DEAD_S}s"
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
