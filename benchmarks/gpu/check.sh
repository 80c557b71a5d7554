#!/usr/bin/env bash
# The GPU check, on a lent GPU machine, after pack.sh's parts have come over (.gpu/parts/):
#
#   bash benchmarks/gpu/check.sh [STAGE ...]     # default: every stage, in this order
#
#   unpack    join the parts into .gpu/site and .gpu/cache (once)
#   export    smollm2-135m fused at fp32 and at fp16 (pt-export --dtype fp16), side by side
#   memcpy    Memcpy nodes under CUDA of both; the fp16 export must have none
#   tests     the tiny-model parity tests (test_generate.py, test_device_search.py) on CUDA
#   parity    16 E2E inputs, greedy and 5 beams, against Hugging Face generate (fp32 and fp16)
#   latency   benchmarks/latency.py --device cuda: fp32, fp16, fp16 with CUDA graphs, Hugging
#             Face generate and Hugging Face with a static cache under torch.compile, one run
#             side by side -> benchmarks/results/latency-cuda.md, with the command and commit
#
# With the workplace's device tool, after `bash benchmarks/gpu/pack.sh` here: one call per part
# on the warm machine, e.g. run(command="ls .gpu/parts", carry=[".gpu/parts/part-00"]), then the
# last part with the first half of the check, and a second call for the rest:
#   run(command="bash benchmarks/gpu/check.sh unpack export memcpy tests", carry=[last part])
#   run(command="bash benchmarks/gpu/check.sh parity latency")   # $OUT brings the results back
# Each stage has its own time limit; a stage that fails is reported and the next one runs.
# Everything goes to .gpu/out/ and, where a benchmark writes them, benchmarks/results/;
# copy them to $OUT to bring them back (the last lines do when $OUT is set).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
G=$ROOT/.gpu
STAGES=${*:-unpack export memcpy tests parity latency}
mkdir -p "$G/out" "$G/src/prefixkit"
for part in runtime exporter training benchmarks evaluation; do ln -sfn "$ROOT/$part" "$G/src/prefixkit/$part"; done
# PYTHON, GPU_SITE and CHECK_PROVIDER let the script be tried elsewhere (a CPU machine: the
# checkout's .venv/bin/python, GPU_SITE=none, CHECK_PROVIDER=CPUExecutionProvider).
PROVIDER=${CHECK_PROVIDER:-CUDAExecutionProvider}
export PYTHONPATH=${GPU_SITE:-$G/site}:$G/src:$ROOT/tests
export PREFIXKIT_CACHE=$G/cache PREFIXKIT_KERNELS=0 PYTHONUNBUFFERED=1
export PREFIXKIT_PROVIDERS=$PROVIDER,CPUExecutionProvider
PY=${PYTHON:-python3}
DEVICE=$([ "$PROVIDER" = CPUExecutionProvider ] && echo cpu || echo cuda)
failed=()

stage() {  # stage NAME SECONDS COMMAND...: run it with a limit, say how it went
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$G/out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$G/out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    [ $rc -eq 0 ] || failed+=("$name")
}

for s in $STAGES; do
    case $s in
        unpack)
            if [ ! -d "$G/site" ]; then
                stage unpack 120 bash -c "cat '$G'/parts/part-* | xz -d | tar -x -C '$G'"
            fi
            $PY -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
            ;;
        export)
            stage export 420 bash -c "$PY -m prefixkit.exporter.cli smollm2-135m -o exports/smollm2-135m & \
                $PY -m prefixkit.exporter.cli smollm2-135m --dtype fp16 -o exports/smollm2-135m-fp16 & wait -n && wait -n"
            ;;
        memcpy)
            stage memcpy 120 $PY benchmarks/gpu/memcpy.py exports/smollm2-135m exports/smollm2-135m-fp16 \
                --provider "$PROVIDER" --expect-none
            ;;
        tests)
            stage tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_device_search.py
            ;;
        parity)
            stage parity 300 $PY benchmarks/parity.py --device "$DEVICE" --export exports/smollm2-135m \
                --export exports/smollm2-135m-fp16
            ;;
        latency)
            stage latency 480 $PY benchmarks/latency.py --device "$DEVICE" --rounds 1 --repeats 5 \
                --configs runtime-fp32,runtime-fp16,runtime-fp16-graphs,hf-generate,hf-static-compile
            ;;
        *) echo "unknown stage $s"; failed+=("$s") ;;
    esac
done

if [ -n "${OUT:-}" ]; then
    cp -r "$G/out" "$OUT/logs" 2>/dev/null
    cp benchmarks/results/latency-cuda.* benchmarks/results/parity-cuda.* "$OUT/" 2>/dev/null
fi
echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
