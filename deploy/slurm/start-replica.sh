#!/bin/bash
# One MACE-Field server on this node (run by srun, one task per GPU node; see macefield.sbatch):
# start it, wait until its health says SERVING, then write "ADDRESS:PORT" to REPLICA_DIR/<node>.addr
# (one file per replica: safe on a shared file system) and stay in the foreground until it exits.
# Slurm signals every process of a step (scancel, the job's end, srun's --signal), so SIGTERM reaches the
# server itself: it drains (finishes its calls) and exits 0, and this script waits for that and removes
# the address file.  Signal the process group (kill -TERM -PGID), not this script alone: the script does
# not pass the signal on, since a server that gets SIGTERM twice stops at once instead of draining.
#
# Environment (all optional):
#   REPLICA_DIR            where the address files go (default: $SLURM_SUBMIT_DIR/replicas-$SLURM_JOB_ID)
#   MACEFIELD_PORT         gRPC port (default 50051); metrics on MACEFIELD_METRICS_PORT (default 9100)
#   MACEFIELD_HEALTH_PORT  plaintext grpc.health.v1-only port this script probes for readiness (default
#                          MACEFIELD_PORT + 1): the probe works whether the gRPC port has TLS or not
#   MACEFIELD_BIND         address to bind (default 0.0.0.0)
#   MACEFIELD_ADVERTISE    address clients use (default: this node's host name)
#   MACEFIELD_SIF          an Apptainer image of the server: run it with `apptainer exec --nv`
#   MACEFIELD_SERVE_ARGS   more macefield-serve options (a config file, TLS, tokens, models)
set -euo pipefail
port=${MACEFIELD_PORT:-50051}
health_port=${MACEFIELD_HEALTH_PORT:-$((port + 1))}
bind=${MACEFIELD_BIND:-0.0.0.0}
advertise=${MACEFIELD_ADVERTISE:-$(hostname)}
dir=${REPLICA_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/replicas-${SLURM_JOB_ID:-local}}
mkdir -p "$dir"
run=()
if [ -n "${MACEFIELD_SIF:-}" ]; then
    run=(apptainer exec --nv "$MACEFIELD_SIF")
fi
# ${run[@]+"${run[@]}"}: an empty array under `set -u` is an error in bash <= 4.3
# shellcheck disable=SC2086  # MACEFIELD_SERVE_ARGS is a list of options
${run[@]+"${run[@]}"} macefield-serve --host "$bind" --port "$port" --health-port "$health_port" \
    --metrics-port "${MACEFIELD_METRICS_PORT:-9100}" --insecure ${MACEFIELD_SERVE_ARGS:-} &
server=$!
trap 'echo "start-replica: signal received; waiting for the server to drain" >&2' TERM INT
probe=$bind
case "$bind" in 0.0.0.0) probe=127.0.0.1 ;; "::" | "[::]") probe="[::1]" ;; esac
until ${run[@]+"${run[@]}"} macefield-health --address "$probe:$health_port" --service macefield.v1.MaceField \
        --timeout 5 >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "start-replica: macefield-serve on $advertise exited before it was ready" >&2
        wait "$server"
        exit 1
    fi
    sleep 2
done
echo "$advertise:$port" > "$dir/.$advertise.addr.tmp" && mv "$dir/.$advertise.addr.tmp" "$dir/$advertise.addr"
echo "start-replica: $advertise:$port ready" >&2
# wait for the server; a wait interrupted by the trap returns > 128 while the drain goes on
while :; do
    status=0
    wait "$server" || status=$?
    kill -0 "$server" 2>/dev/null || break
done
if [ "$status" -gt 128 ]; then  # the trap's status, or the server's own: ask once more (127: already reported)
    again=0
    wait "$server" || again=$?
    [ "$again" -eq 127 ] || status=$again
fi
rm -f "$dir/$advertise.addr"
exit "$status"
