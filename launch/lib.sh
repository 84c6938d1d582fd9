# Shared by launch/local.sh and launch/slurm/node.sh (sourced, not run).

# KEY=VALUE ... -> one --config.KEY=VALUE argument each (a leading --flag passes through).
config_flags() {
  local arg
  for arg in "$@"; do
    case "${arg}" in
      --*) printf '%s\n' "${arg}" ;;
      *=*) printf '%s\n' "--config.${arg}" ;;
      *) echo "launch: expected KEY=VALUE (e.g. train.steps=100), got '${arg}'" >&2; return 2 ;;
    esac
  done
}

# spawn_training COUNT FIRST_ID TOTAL COORDINATOR LOG_DIR CONFIG WORKDIR [KEY=VALUE ...]
# Starts COUNT esjax.main processes with process ids FIRST_ID.. (of TOTAL), each with the
# ESJAX_* variables that esjax/parallel/multihost.py reads and its log in
# LOG_DIR/<host>-rank<id>.log. Process i drives local GPU i, or, with ESJAX_CPU_DEVICES=N,
# N CPU devices. Waits for all; the first one that fails stops the others, and its exit
# status is returned. SIGTERM / SIGINT are forwarded once to all of them (see below).
spawn_training() {
  local count=$1 first=$2 total=$3 coordinator=$4 log_dir=$5 config=$6 workdir=$7
  shift 7
  local flags python overrides=()
  flags=$(config_flags "$@") || return 2
  if [[ -n "${flags}" ]]; then mapfile -t overrides <<<"${flags}"; fi
  python=$(esjax_python)
  if [[ -n "${ESJAX_CPU_DEVICES:-}" ]]; then
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${ESJAX_CPU_DEVICES}"
  fi
  mkdir -p "${log_dir}"
  local pids=() i id host status=0 done_pid follower=""
  local -A id_of=()
  host=$(hostname)
  for ((i = 0; i < count; i++)); do
    id=$((first + i))
    (
      export ESJAX_COORDINATOR="${coordinator}" ESJAX_NUM_PROCESSES="${total}"
      export ESJAX_PROCESS_ID="${id}"
      if [[ -z "${ESJAX_CPU_DEVICES:-}" ]]; then export ESJAX_LOCAL_DEVICE_IDS="${i}"; fi
      exec "${python}" -m esjax.main --config="${config}" --workdir="${workdir}" \
        ${overrides[@]+"${overrides[@]}"} >"${log_dir}/${host}-rank${id}.log" 2>&1
    ) &
    pids+=("$!")
    id_of[$!]=${id}
  done
  echo "launch: ${count} processes (ids ${first}..$((first + count - 1)) of ${total}," \
       "coordinator ${coordinator}); logs in ${log_dir}" >&2
  if [[ ${first} -eq 0 ]]; then  # rank 0's step lines and messages (not its progress bar)
    (tail -n +1 -F "${log_dir}/${host}-rank0.log" 2>/dev/null | sed -u 's/.*\r//' \
      | grep --line-buffered -E '^(step |esjax|resumed|done:|checkpoint )' >&2 || true) &
    follower=$!
  fi
  # SIGTERM / SIGINT (preemption, Ctrl-C) go to every process once: each saves a checkpoint
  # and exits 75 (esjax.main); the launcher waits for them and returns that status.
  local stopping=0 final=0
  trap 'stopping=1; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
  for ((i = 0; i < count; )); do
    status=0 done_pid=""
    wait -n -p done_pid || status=$?
    # Woken by the trap or by the log follower, not by a process: wait on.
    [[ -n "${done_pid:-}" && -n "${id_of[${done_pid}]:-}" ]] || continue
    i=$((i + 1))
    echo "launch: rank ${id_of[${done_pid}]} exited with status ${status}" >&2
    if [[ ${status} -ne 0 && ${stopping} -eq 0 ]]; then
      # SIGKILL: with a peer gone the others cannot save (a checkpoint needs every process)
      # and would sit in a collective until the heartbeat timeout; the last one is intact.
      echo "launch: process pid ${done_pid} failed (exit ${status}); stopping the others" >&2
      kill -KILL "${pids[@]}" 2>/dev/null || true
      stop_follower "${follower}"
      wait 2>/dev/null || true
      trap - TERM INT
      return "${status}"
    fi
    [[ ${status} -eq 0 ]] || final=${status}
  done
  stop_follower "${follower}"
  trap - TERM INT
  return "${final}"
}

# Stops the console's view of rank 0's log (the subshell running `tail -F | ...`), after it
# has shown the last lines.
stop_follower() {
  [[ -n "$1" ]] || return 0
  sleep 0.5
  pkill -P "$1" tail 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# The Python to run: $ESJAX_PYTHON, else the project's .venv, else python3.
esjax_python() {
  if [[ -n "${ESJAX_PYTHON:-}" ]]; then echo "${ESJAX_PYTHON}"
  elif [[ -x .venv/bin/python ]]; then echo "${PWD}/.venv/bin/python"
  else echo python3; fi
}
