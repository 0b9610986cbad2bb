#!/usr/bin/env bash
# Issue 6's GPU measurements, in parts that each fit one 10-minute call of the device tool.
#
#   here, once:   bash benchmarks/gpu.sh wheels        # ftfy + wcwidth (all the GPU image lacks) -> .whl/
#   on the GPU:   bash benchmarks/gpu.sh PART          # with .whl carried; records go to $OUT (or /tmp)
#
# PART: check    benchmarks/gpu_check.py: runtime/cuda.py on the driver, the static step (tiny, W768)
#       tests    CUDA-graph replay and the other GPU cases of the test suite
#       w768     W768, 1 sample: official pattern vs the static loop (CUDA graph) and channels-last
#       compiled W768, 1 sample: torch.compile (compilation happens in the untimed check run)
#       compiled-channels-last   the same, with NHWC convolutions
#       w768x4   W768, 4 samples (images/s)
#       official W768 loop of the official implementation itself (FLASHFACE_OFFICIAL_SRC: its checkout)
set -euo pipefail
part=${1:?usage: bash benchmarks/gpu.sh wheels|check|tests|w768|compiled|compiled-channels-last|w768x4|official}
out=${OUT:-/tmp}
suite=(python3 -m benchmarks.suite --preset sd15-random --device cuda --precision fp16)

if [[ $part == wheels ]]; then
    pip download --no-deps --only-binary :all: -d .whl ftfy wcwidth
    exit 0
fi
python3 -m pip install -q --no-index --find-links .whl ftfy wcwidth
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case $part in
    check) python3 -m benchmarks.gpu_check --out "$out" ;;
    tests) python3 -m pytest -q -rs tests/test_static_step.py tests/test_torch_settings.py tests/test_engine.py ;;
    w768) "${suite[@]}" --variants auto,channels-last --json "$out/w768.json" ;;
    compiled | compiled-channels-last) "${suite[@]}" --variants "$part" --json "$out/w768-$part.json" ;;
    w768x4) "${suite[@]}" --samples 4 --variants auto --repeats 2 --json "$out/w768x4.json" ;;
    official)
        "${suite[@]}" --variants auto --official-src "${FLASHFACE_OFFICIAL_SRC:?set it}" --json "$out/w768-official.json"
        ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
esac
