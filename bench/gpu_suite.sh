#!/usr/bin/env bash
# The GPU suite: run on a lent GPU machine (no network) from the repo root, in at most 6 minutes:
#   bash bench/gpu_suite.sh
# 1. installs this checkout offline (pip --no-deps --no-build-isolation -e .), plus any wheels carried
#    in .whl/ (Liger and cut_cross_entropy, the fused linear+CE peers: `make gpu-wheels` fetches them here);
# 2. `beit-fast info`; 3. the `gpu` tests; 4. every benchmark in bench/;
# 5. prints a compact table last and writes JSON + Markdown under $OUT (default bench/results/latest).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/latest}"
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
echo "== gpu tests"
timeout 60 $PY -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "== benchmarks"
timeout 280 $PY -m pytest bench -q -s -p no:cacheprovider --benchmark-columns=median,rounds 2>&1 | tee "$OUT/bench_log.txt"
bench_rc=${PIPESTATUS[0]}
echo "== summary ($(( $(date +%s) - start )) s; gpu tests rc=$tests_rc, benchmarks rc=$bench_rc)"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit $(( tests_rc != 0 || bench_rc != 0 ))
