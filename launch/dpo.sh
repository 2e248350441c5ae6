#!/usr/bin/env bash
# DPO on this node (one torchrun); run it on every node of a multi-node job.
#   launch/dpo.sh RECIPE.yaml [--set key=value ...] [--dry-run]
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/dpo.sh launch/recipes/llama3.1-70b-dpo.yaml
# Environment variables and their defaults: launch/common.sh. DRY_RUN=1 prints the command.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tulu3_launch dpo "$@"
