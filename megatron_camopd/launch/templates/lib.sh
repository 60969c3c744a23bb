# ---------------------------------------------------------------------------------------------------------------
# Shared functions (inlined by `camopd sbatch` from megatron_camopd/launch/templates/lib.sh; edit them there).
# ---------------------------------------------------------------------------------------------------------------
log() { echo "[camopd $(date +%H:%M:%S)] $*"; }
die() { log "ERROR: $*"; exit 1; }

http_ok() {  # URL -> success when it answers 2xx within 5 s
  "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" >/dev/null 2>&1
}

node_addr() {  # Slurm node name -> the address its daemons use (NodeAddr; the node name on most clusters)
  local addr
  addr=$(scontrol show node "$1" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  echo "${addr:-$1}"
}

register_address() {  # FILE HOST:PORT -> append a line under a lock and publish atomically (temp file + rename)
  local file=$1 addr=$2
  (
    flock 9
    { if [[ -f $file ]]; then cat "$file"; fi; echo "$addr"; } >"$file.tmp.$$"
    mv "$file.tmp.$$" "$file"
  ) 9>"$file.lock"
}

serve_one_teacher() {  # NAME MODEL ADDR_FILE: one server on this node; registered once /health answers
  local name=$1 model=$2 addr_file=$3 host port="" server ready deadline rc
  host=$(hostname)
  ready="$addr_file.$host.$$.ready"
  if [[ $TEACHER_BACKEND == sglang ]]; then
    port=$SGLANG_PORT
    # shellcheck disable=SC2086  # SGLANG_ARGS is a plain word list
    "$PYTHON" -m sglang.launch_server --model-path "$model" --host 0.0.0.0 --port "$port" \
      --tp "$TEACHER_TP" $SGLANG_ARGS &
  else
    "$PYTHON" -m megatron_camopd.cli serve-teacher --checkpoint "$model" --host 0.0.0.0 --port 0 \
      --ready-file "$ready" &
  fi
  server=$!
  trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit 0' TERM INT
  deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  while :; do
    if ! kill -0 "$server" 2>/dev/null; then
      rc=0; wait "$server" || rc=$?
      die "teacher $name on $host exited (rc=$rc) before it was healthy"
    fi
    if [[ -z $port && -s $ready ]]; then port=$(cut -d: -f2 <"$ready" | tr -d '[:space:]'); fi
    if [[ -n $port ]] && http_ok "http://$host:$port/health"; then break; fi
    if ((SECONDS >= deadline)); then
      kill -TERM "$server" 2>/dev/null || true
      die "teacher $name on $host not healthy after ${HEALTH_TIMEOUT_S}s"
    fi
    sleep 1
  done
  rm -f "$ready"
  register_address "$addr_file" "$host:$port"
  log "teacher $name serves $model at $host:$port"
  rc=0; wait "$server" || rc=$?
  log "teacher $name on $host stopped (rc=$rc)"
  return "$rc"
}

wait_for_teachers() {  # DIR ALIVE_CHECK: every teacher lists TEACHER_NODES healthy replicas, or fail clearly
  local dir=$1 alive_check=$2 name addr n deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  for name in "${TEACHERS[@]}"; do
    while :; do
      n=0
      if [[ -f $dir/$name.addr ]]; then
        while read -r addr; do
          if [[ -n $addr ]] && http_ok "http://$addr/health"; then n=$((n + 1)); fi
        done <"$dir/$name.addr"
      fi
      ((n >= TEACHER_NODES)) && break
      $alive_check || die "teacher servers stopped before teacher $name was healthy (see the log above)"
      ((SECONDS < deadline)) || die "teacher $name: $n/$TEACHER_NODES healthy servers after ${HEALTH_TIMEOUT_S}s"
      sleep 1
    done
    log "teacher $name ready: $(tr '\n' ' ' <"$dir/$name.addr")"
  done
}

teacher_overrides() {  # DIR -> the trainer's overrides pointing each served teacher at its discovery file
  local name
  for name in "${TEACHERS[@]}"; do
    printf '%s\n' "teachers.$name.hf_path=null" "teachers.$name.checkpoint=null" \
      "teachers.$name.discovery_file=$1/$name.addr"
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
  export NODES NPROC_PER_NODE SHUTDOWN_TIMEOUT_S PYTHON
  log "trainer: $NODES node(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"
  # Signals sent to srun or torchrun reach whole process groups (and so the trainer's checkpoint-writer
  # helpers); preemption instead signals the trainer processes themselves (see on_preempt).
  srun "$@" --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
    'trap "" USR1; echo $$ >"$PID_PREFIX.$SLURM_NODEID.pid"
     exec "$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$NPROC_PER_NODE" \
       --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
       --shutdown-timeout="$SHUTDOWN_TIMEOUT_S" -m megatron_camopd.cli train "$@"' \
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

declare -A WATCH_NAMES=()  # pid -> what it is (teacher srun steps, the health watchdog)

watch_teachers() {  # DIR: exits once a teacher has had no healthy server for TEACHER_DEAD_S (a watchdog job)
  local dir=$1 name addr ok since
  declare -A down=()
  while sleep "$WATCH_INTERVAL_S"; do
    for name in "${TEACHERS[@]}"; do
      ok=0
      while read -r addr; do
        if [[ -n $addr ]] && http_ok "http://$addr/health"; then ok=1; break; fi
      done <"$dir/$name.addr"
      if ((ok)); then unset "down[$name]"; continue; fi
      since=${down[$name]:-$SECONDS}
      down[$name]=$since
      if ((SECONDS - since >= TEACHER_DEAD_S)); then
        log "ERROR: teacher $name: no healthy server in $dir/$name.addr for ${TEACHER_DEAD_S}s"
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
      log "ERROR: teacher server ($TEACHER_DIED) died; stopping the trainer"
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
    teardown_teachers
    die "training stopped because a teacher server died (trainer rc=$TRAINER_RC); see the teacher log lines above"
  fi
  if ((TRAINER_RC == EXIT_REQUEUE)) || { ((PREEMPTED)) && ((TRAINER_RC != 0)); }; then
    log "trainer checkpointed (rc=$TRAINER_RC): requeueing job $SLURM_JOB_ID"
    requeue_teardown
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  teardown_teachers
  ((TRAINER_RC == 0)) || die "trainer failed (rc=$TRAINER_RC)"
  log "training finished"
}
