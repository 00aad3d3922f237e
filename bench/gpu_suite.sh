#!/usr/bin/env bash
# The GPU suite, run on a lent GPU machine (no network) from the repo root.
#   SUITE=quick   bash bench/gpu_suite.sh   # <= 7 min on an H100: the kernels' gpu tests (one file at a time) + the
#                                           # attention, fused CE, masked_embed, gather-LN, tokenizer benches + the e2e
#                                           # backbone step (ours vs timm-composed eager) + the pixel-target step (vs
#                                           # the token-target step, tokens given) + the e2e fine-tuning step
#                                           # (ours on the Triton attention vs timm's beit_base_patch16_224, eager) +
#                                           # the e2e segmentation step (BEiT-B + UperNet at 512, ours vs transformers'
#                                           # BeitForSemanticSegmentation with SDPA) + the drop-in steps (timm
#                                           # beit_base_patch16_224 and transformers' MIM model, unpatched vs
#                                           # beit_fast.patch) + the input pipeline (bench_data.py: per-core
#                                           # paths, the gpu backend's device half); nothing compiled by inductor.
#                                           # Run it once before a kernel change and once after (bench/results/).
#   SUITE=kernels bash bench/gpu_suite.sh   # every gpu test + the kernel benches with all peers (torch.compile too)
#   SUITE=e2e     bash bench/gpu_suite.sh   # the whole pretraining step against every peer (~7 min) + the
#                                           # fine-tuning, segmentation and drop-in steps
#   bash bench/gpu_suite.sh                 # kernels + e2e (SUITE=all; over 10 minutes: for a machine of your own)
# 1. installs this checkout offline (pip --no-deps --no-build-isolation -e .), plus any wheels carried in .whl/
#    (`make gpu-wheels`: Liger, cut_cross_entropy, dall_e, DeepSpeed and its pure-Python dependencies);
# 2. `beit-fast info`; 3. the `gpu` tests, each file under its own time limit (cold Triton compiles included);
# 4. the benchmarks of the part; a peer that fails is a recorded row, never the end of the run;
# 5. prints a compact table last and writes JSON + Markdown under $OUT (default bench/results/latest).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/latest}"
SUITE="${SUITE:-all}"
case "$SUITE" in quick|kernels|e2e|all) ;; *) echo "gpu_suite: SUITE must be quick, kernels, e2e or all (got $SUITE)"; exit 2 ;; esac
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
: > "$OUT/gpu_tests.txt"

gpu_tests() {  # gpu_tests LIMIT_S FILE...: each file in its own pytest under its own limit (a hang costs one file)
    local limit=$1; shift
    for f in "$@"; do
        echo "== gpu tests: $f" | tee -a "$OUT/gpu_tests.txt"
        timeout "$limit" $PY -m pytest "$f" -m gpu -q -p no:cacheprovider 2>&1 | tail -n 25 | tee -a "$OUT/gpu_tests.txt"
        local rc=${PIPESTATUS[0]}
        # 5 = nothing selected in this file: not a failure of the suite
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then tests_rc=1; echo "   (rc=$rc)" | tee -a "$OUT/gpu_tests.txt"; fi
    done
}

bench() {  # bench LIMIT_S LOG ARGS...
    local limit=$1 log=$2; shift 2
    timeout "$limit" $PY -m pytest "$@" -q -s -p no:cacheprovider --benchmark-columns=median,rounds 2>&1 \
        | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then bench_rc=1; echo "   (rc=$rc: $*)" | tee -a "$OUT/$log"; fi
}

KERNEL_TESTS="tests/test_attention.py tests/test_kernels.py tests/test_tokenizer_head.py tests/test_tokenizer.py"
case "$SUITE" in
    quick)
        export BEIT_BENCH_QUICK=1
        gpu_tests 100 $KERNEL_TESTS
        # one pytest session, so one results table (rows are written as they come: a time-out keeps them)
        echo "== benchmarks (quick): attention, fused CE, masked_embed, gather-LN, tokenizer, e2e backbone," \
            "fine-tuning, segmentation and drop-in steps"
        bench 420 bench_log.txt bench/bench_attention.py bench/bench_kernels.py bench/bench_tokenizer.py \
            bench/bench_e2e.py bench/bench_dropin.py bench/bench_data.py \
            -k "not test_e2e or backbone_step or pixel_target_step or finetune_step or segment_step or test_dropin"
        ;;
    kernels|all)
        gpu_tests 240 $(grep -l "mark.gpu" tests/test_*.py)
        echo "== kernel benchmarks"
        bench 400 bench_log.txt bench/bench_masking.py bench/bench_kernels.py bench/bench_attention.py \
            bench/bench_tokenizer.py
        ;;&
    e2e|all)
        echo "== end-to-end benchmarks"
        [ "$SUITE" = all ] && export BENCH_OUT="$OUT/e2e"  # its own table: a second session would overwrite the first
        bench 540 bench_e2e_log.txt bench/bench_e2e.py bench/bench_dropin.py
        ;;
esac
echo "== summary ($(( $(date +%s) - start )) s; suite $SUITE; gpu tests rc=$tests_rc, benchmarks rc=$bench_rc)"
for md in "$OUT/bench.md" "$OUT/e2e/bench.md"; do [ -f "$md" ] && cat "$md"; done
exit $(( tests_rc != 0 || bench_rc != 0 ))
