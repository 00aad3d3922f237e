#!/usr/bin/env bash
# The GPU suite, run on a lent GPU machine (no network) from the repo root. Two parts, each sized for one
# device call of at most 10 minutes:
#   SUITE=kernels bash bench/gpu_suite.sh   # gpu tests + kernel, attention, tokenizer, masking benchmarks (~6 min)
#   SUITE=e2e     bash bench/gpu_suite.sh   # the whole pretraining step against the peers (~7 min)
#   bash bench/gpu_suite.sh                 # both (SUITE=all; over 10 minutes: for a machine of your own)
# 1. installs this checkout offline (pip --no-deps --no-build-isolation -e .), plus any wheels carried in .whl/
#    (`make gpu-wheels`: Liger, cut_cross_entropy, dall_e, DeepSpeed and its pure-Python dependencies);
# 2. `beit-fast info`; 3. the `gpu` tests; 4. the benchmarks of the part;
# 5. prints a compact table last and writes JSON + Markdown under $OUT (default bench/results/latest).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/latest}"
SUITE="${SUITE:-all}"
case "$SUITE" in kernels|e2e|all) ;; *) echo "gpu_suite: SUITE must be kernels, e2e or all (got $SUITE)"; exit 2 ;; esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BENCH_OUT="$OUT"
PY="${PYTHON:-python3}"
start=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_suite: install failed"; exit 1; }

$PY -m beit_fast.cli info 2>&1 | tee "$OUT/info.txt"
tests_rc=0
bench_rc=0
case "$SUITE" in
    kernels|all)
        echo "== gpu tests"
        timeout 60 $PY -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
        tests_rc=${PIPESTATUS[0]}
        echo "== kernel benchmarks"
        timeout 280 $PY -m pytest bench/bench_masking.py bench/bench_kernels.py bench/bench_attention.py \
            bench/bench_tokenizer.py -q -s -p no:cacheprovider --benchmark-columns=median,rounds 2>&1 \
            | tee "$OUT/bench_log.txt"
        bench_rc=${PIPESTATUS[0]}
        ;;&
    e2e|all)
        echo "== end-to-end benchmarks"
        timeout 420 $PY -m pytest bench/bench_e2e.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/bench_e2e_log.txt"
        e2e_rc=${PIPESTATUS[0]}
        bench_rc=$(( bench_rc != 0 || e2e_rc != 0 ))
        ;;
esac
echo "== summary ($(( $(date +%s) - start )) s; suite $SUITE; gpu tests rc=$tests_rc, benchmarks rc=$bench_rc)"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit $(( tests_rc != 0 || bench_rc != 0 ))
