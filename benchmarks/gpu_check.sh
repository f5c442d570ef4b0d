#!/usr/bin/env bash
# The GPU check: one script a GPU machine runs unchanged from the repository root, after `make .venv/.installed`.
# Each section runs under a timeout of its own, so that a slow part cannot eat the whole budget; a section that
# fails or times out is reported and the next one runs. Results: runs/gpu_check/ (JSON per section, and the
# rehearsal's table). Sections and what each measures on a GPU:
#   env       the card (name, memory, driver) and the software versions
#   engine    the teacher engine's images/s for legacy_senet154 and resnet152 (bf16, channels_last, compiled),
#             batch 64 and 256: bare, through the gRPC server, through Ray Serve (served ÷ bare); peak memory
#   student   the L1-pruned ResNet-50 at batch 256: steps/s with CE and with KD from the warm bank through
#             the service (warm KD ÷ CE), `ekd warm` views/s per GPU, peak GPU memory
#             (benchmarks/rehearsal.py --scale gpu --device cuda)
# --cpu asks the same questions at tiny sizes on the CPU: the script's own end-to-end check.
#
#     bash benchmarks/gpu_check.sh            # on a GPU machine
#     bash benchmarks/gpu_check.sh --cpu      # here, without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/gpu_check
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu" ]; then
    MODE=(--cpu); REHEARSAL=(--quick --device cpu)
    ENV_S=120; ENGINE_S=600; STUDENT_S=600
else
    MODE=(); REHEARSAL=(--scale gpu --device cuda)
    ENV_S=60; ENGINE_S=330; STUDENT_S=330
fi
export RAY_AUTH_MODE=disabled
# Ray's workers at the driver's priority, not Ray's default nice 15: the figures compare paths, not shares.
export RAY_worker_niceness=0

section() {  # name, seconds, command...
    local name=$1 seconds=$2; shift 2
    echo "== $name (at most ${seconds} s)"
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    if [ $status -eq 0 ]; then
        echo "   done in $((SECONDS - started)) s"
    elif [ $status -eq 124 ] || [ $status -eq 137 ]; then
        echo "   TIMED OUT after ${seconds} s (log: $OUT/$name.log)"
    else
        echo "   FAILED with status $status (log: $OUT/$name.log)"; tail -5 "$OUT/$name.log" | sed 's/^/   /'
    fi
    return 0
}

section env "$ENV_S" "$PY" benchmarks/gpu_check.py --section env "${MODE[@]}" --out "$OUT"
cat "$OUT/env.json" 2>/dev/null
section engine "$ENGINE_S" "$PY" benchmarks/gpu_check.py --section engine "${MODE[@]}" --out "$OUT"
cat "$OUT/engine.json" 2>/dev/null
section student "$STUDENT_S" "$PY" benchmarks/rehearsal.py "${REHEARSAL[@]}" --work "$OUT/rehearsal"
sed -n '/seed-000 rehearsal/,$p' "$OUT/student.log"
