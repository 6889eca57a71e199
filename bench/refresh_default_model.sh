#!/usr/bin/env bash
# Re-measure everything the repository quotes about the embedded default model, in dependency order, after its
# weights change (docs/models.md, "Releasing a new default model", says what each result feeds and what to edit).
#
#   bench/refresh_default_model.sh [STEP ...]        from the repository root, data in ../shared/data
#
# Steps (all, in this order, when none is named):
#   short_range  float64 pair scans -> bench/results/short_range_default.json (asserted by tests/test_short_range.py)
#   card         validation numbers of the card, with the newest stage config's card text (--refresh-card)
#   calibrate    extrapolation statistics of both heads, recorded in the card (the exact commands the card
#                and docs/extrapolation.md print)
#   flags        what the grade flags -> bench/results/extrapolation_field.json and the card's "What it flags"
#   cost         bench/results/extrapolation_cost_cpu.json (the grade's overhead)
#   engines      bench/results/md_engines_cpu.json
#   nve          bench/results/nve_drift_cpu.json: energy conservation in NVE, float32 and float64 (35-50 min)
#   workflows    bench/results/workflows_cpu.json (~21 min)
#   hysteresis   bench/results/hysteresis_period_cpu.json (~15 min)
#   ensemble     bench/results/ensemble_eps_static_cpu.json (~5 min)
#   allocator    bench/results/allocator-cpu-<UTC>.json
#   prints       measurements the docs quote that tests print (-s): restart time, the energy floor below the
#                relaxed crystal, the fluctuation eps_0 of the test ensemble; and the README's phonon and loop
#                outputs
# Logs and the printed outputs go to $REFRESH_LOGS (default /tmp/refresh-default-model), one file per step.
# Timings want a quiet machine: nothing else running on the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${REFRESH_LOGS:-/tmp/refresh-default-model}
mkdir -p "$LOGS"
WEIGHTS=server/macefield_server/weights
MODEL=$WEIGHTS/default.pt
STAGE=$("$PY" -c "from macefield_server.weights import DEFAULT_TRAINING_STAGES as s; print(s[-1].name)")

step_short_range() { "$PY" bench/short_range.py --model "$MODEL" --out bench/results/short_range_default.json; }
step_card() { macefield-train --config "$WEIGHTS/$STAGE" --refresh-card "$MODEL"; }
step_calibrate() {
    # these command lines are recorded in the card and printed in docs/extrapolation.md: keep them as they are
    macefield-calibrate server/macefield_server/weights/default.pt ../shared/data/sio2-quartz-md.xyz --head sio2 --frames 0:129 --holdout-frames 129: --holdout-fields 0.05 0.1 0.36 -o server/macefield_server/weights/default.pt --card server/macefield_server/weights/default.card.json
    macefield-calibrate server/macefield_server/weights/default.pt ../shared/data/batio3-md.xyz --head batio3 --frames 0:38 --holdout-frames 38: --holdout-fields 0.05 0.1 0.36 -o server/macefield_server/weights/default.pt --card server/macefield_server/weights/default.card.json
}
# recorded in the card as written (sys.argv): `python`, relative paths
step_flags() { (PATH="$(dirname "$(command -v "$PY")"):$PATH"; python bench/extrapolation_field.py --out bench/results/extrapolation_field.json --card); }
step_cost() { "$PY" bench/extrapolation_cost.py --out bench/results/extrapolation_cost_cpu.json; }
step_engines() { "$PY" bench/md_engines.py --out bench/results/md_engines_cpu.json; }
step_nve() { "$PY" bench/nve_drift.py --out bench/results/nve_drift_cpu.json; }
step_workflows() { "$PY" bench/workflows.py --out bench/results/workflows_cpu.json; }
step_hysteresis() { "$PY" bench/hysteresis_period.py --out bench/results/hysteresis_period_cpu.json; }
step_ensemble() { "$PY" bench/ensemble_eps_static.py --out bench/results/ensemble_eps_static_cpu.json; }
step_allocator() { "$PY" bench/allocator.py; }
step_prints() {
    MACEFIELD_REQUIRE_DATA=1 MACEFIELD_REQUIRE_LAMMPS=1 "$PY" -m pytest -q -s -p no:cacheprovider \
        "tests/test_client_restart.py::test_default_retry_policy_rides_out_a_measured_restart" \
        "tests/test_short_range.py::test_nothing_below_the_relaxed_crystal_goes_unflagged" \
        "tests/test_workflows_eps_md.py"
    # the README's workflow blocks, against a server on the default model (README: `make serve`)
    macefield-serve --port 0 --metrics-port 0 >"$LOGS/serve.out" 2>"$LOGS/serve.err" &
    local server=$! port="" rc=0
    for _ in $(seq 600); do
        grep -q '"event": "ready"' "$LOGS/serve.out" 2>/dev/null && break
        kill -0 "$server" 2>/dev/null || { echo "macefield-serve exited" >&2; return 1; }
        sleep 0.5
    done
    grep -q '"event": "ready"' "$LOGS/serve.out" || { echo "macefield-serve not ready after 300 s" >&2; kill "$server"; return 1; }
    port=$("$PY" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["port"])' "$LOGS/serve.out")
    {
        macefield phonons alpha-quartz --server "127.0.0.1:$port" --head sio2 --relax --json "$LOGS/quartz_phonons.json" &&
        macefield hysteresis batio3 --server "127.0.0.1:$port" --head batio3 --axis z --amplitude 0.3636 \
            --period 0.5 --timestep 2 --damping 0.02 --record-every 1 --json "$LOGS/batio3_loop.json"
    } || rc=$?
    kill "$server" && wait "$server" || true
    return "$rc"
}

ALL=(short_range card calibrate flags cost engines nve workflows hysteresis ensemble allocator prints)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL[@]}")
for s in "${STEPS[@]}"; do
    if ! declare -F "step_$s" >/dev/null; then
        echo "unknown step: $s (steps: ${ALL[*]})" >&2
        exit 2
    fi
done
for s in "${STEPS[@]}"; do
    start=$(date +%s)
    echo "== $s ($(date -u +%H:%M:%S) UTC) -> $LOGS/$s.log"
    # a subshell with errexit of its own: a failing command fails its step (inside `if` it would not)
    set +e
    (set -e; "step_$s") >"$LOGS/$s.log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        echo "step $s failed (exit $rc): see $LOGS/$s.log" >&2
        tail -20 "$LOGS/$s.log" >&2
        exit 1
    fi
    echo "   done in $(( $(date +%s) - start )) s"
done
