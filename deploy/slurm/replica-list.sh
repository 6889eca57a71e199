#!/bin/bash
# Print the replicas of REPLICA_DIR as one comma-separated list (a MACEFIELD_SERVER value: the client
# balances over all of them) once COUNT of them have written their address; exit 1 after TIMEOUT seconds.
#   MACEFIELD_SERVER=$(deploy/slurm/replica-list.sh "$REPLICA_DIR" "$SLURM_JOB_NUM_NODES" 900)
set -euo pipefail
dir=$1 count=$2 timeout=${3:-900}
end=$((SECONDS + timeout))
while :; do
    shopt -s nullglob
    files=("$dir"/*.addr)
    if [ "${#files[@]}" -ge "$count" ]; then
        cat "${files[@]}" | paste -sd, -
        exit 0
    fi
    if [ "$SECONDS" -ge "$end" ]; then
        echo "replica-list: ${#files[@]} of $count replicas ready in $dir after ${timeout} s" >&2
        exit 1
    fi
    sleep 2
done
