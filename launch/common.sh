# shellcheck shell=bash
# Shared by launch/{sft,dpo,rlvr}.sh: start one torchrun per node running `python -m tulu3.train`.
#
#   launch/sft.sh RECIPE.yaml [--set key=value ...] [--dry-run]
#
# Environment (every value has a default for a single node):
#   RECIPE          recipe YAML, when it is not the first argument
#   NNODES          nodes in the job                      (SLURM_NNODES, else 1)
#   NODE_RANK       this node's index, 0..NNODES-1         (SLURM_NODEID, else 0)
#   MASTER_ADDR     address of node 0                      (127.0.0.1)
#   MASTER_PORT     rendezvous port on node 0              (29500)
#   GPUS_PER_NODE   processes per node: the GPUs nvidia-smi lists (CUDA_VISIBLE_DEVICES when
#                   set), or 4 CPU processes (gloo) on a machine without GPUs
#   LOG_DIR         this node's output is also written to LOG_DIR/nodeNODE_RANK.log (runs/logs);
#                   NCCL's flight-recorder dumps go to LOG_DIR/nccl_trace/ on a timeout
#   TORCHRUN        launcher command                       (torchrun)
#   DRY_RUN=1       print the torchrun command line (stdout) and the environment (stderr), exit
# NCCL / CUDA variables below are only defaults: a value already in the environment wins.

tulu3_die() {
    echo "launch: $*" >&2
    exit 2
}

# Processes per node: the visible GPUs, or 4 CPU ranks when there is no GPU.
tulu3_local_gpus() {
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if ((count > 0)) && [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        count=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    fi
    if ((count > 0)); then echo "$count"; else echo 4; fi
}

tulu3_check_int() {  # NAME VALUE MIN
    if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
        tulu3_die "$1 must be an integer >= $3, got '$2'"
    fi
}

# The environment a Megatron run wants; each line only fills in what the user has not set.
tulu3_export_env() {
    # Megatron orders TP / sequence-parallel communication behind compute on one CUDA queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # Fail a hung collective with an error instead of blocking forever; long IB retry timeout.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Megatron's recommendation: record_stream keeps freed activations alive longer.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # torch's flight recorder: on NCCL the watchdog ends the job at a collective timeout before
    # tulu3's own message (tulu3/parallel/heartbeat.py, gloo) can name the stuck rank; each rank
    # then dumps its last collectives to LOG_DIR/nccl_trace/rank_N, and
    # `torchfrtrace LOG_DIR/nccl_trace` names the rank that never joined (torchtitan does the same).
    export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$LOG_DIR/nccl_trace/rank_}
    # One process per GPU shares the node's cores; torch would otherwise take them all per rank.
    local cores
    cores=$(nproc 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / GPUS_PER_NODE > 0 ? cores / GPUS_PER_NODE : 1))}
}

tulu3_launch() {  # STAGE [RECIPE] [ARGS...]
    local stage=$1
    shift
    local recipe=${RECIPE:-}
    if [[ $# -gt 0 && $1 != -* ]]; then
        recipe=$1
        shift
    fi
    [[ -n $recipe ]] || tulu3_die "usage: launch/$stage.sh RECIPE.yaml [--set key=value ...] (or RECIPE=...)"
    [[ -f $recipe ]] || tulu3_die "recipe not found: $recipe"

    NNODES=${NNODES:-${SLURM_NNODES:-1}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MASTER_PORT=${MASTER_PORT:-29500}
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(tulu3_local_gpus)}
    tulu3_check_int NNODES "$NNODES" 1
    tulu3_check_int NODE_RANK "$NODE_RANK" 0
    tulu3_check_int GPUS_PER_NODE "$GPUS_PER_NODE" 1
    tulu3_check_int MASTER_PORT "$MASTER_PORT" 1
    ((NODE_RANK < NNODES)) || tulu3_die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
    LOG_DIR=${LOG_DIR:-runs/logs}
    tulu3_export_env

    local -a cmd
    read -r -a cmd <<<"${TORCHRUN:-torchrun}"
    cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        -m tulu3.train --stage "$stage" --config "$recipe" "$@")

    if [[ ${DRY_RUN:-0} == 1 ]]; then
        local name
        for name in CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_IB_TIMEOUT \
            NCCL_DEBUG TORCH_NCCL_AVOID_RECORD_STREAMS PYTORCH_CUDA_ALLOC_CONF OMP_NUM_THREADS \
            TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_NCCL_DEBUG_INFO_TEMP_FILE; do
            echo "# $name=${!name}" >&2
        done
        printf '%q' "${cmd[0]}"
        printf ' %q' "${cmd[@]:1}"
        echo
        return 0
    fi

    mkdir -p "$LOG_DIR" "$(dirname "$TORCH_NCCL_DEBUG_INFO_TEMP_FILE")"
    local log="$LOG_DIR/node${NODE_RANK}.log"
    echo "launch: node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes, log $log" >&2
    local status=0
    "${cmd[@]}" 2>&1 | tee -a "$log" || status=${PIPESTATUS[0]}
    return "$status"
}
