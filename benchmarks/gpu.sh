#!/usr/bin/env bash
# The GPU measurements, each fitting one 10-minute call on the GPU machine (records go to $OUT or /tmp).
#
#   here, once:   bash benchmarks/gpu.sh wheels [OFFICIAL]   # .whl/: the wheels the GPU image lacks;
#                                                            # .official/: the official checkout's sources
#   on the GPU:   bash benchmarks/gpu.sh PART                # carry [".whl", ".official"]
#
# PART: check    benchmarks/gpu_check.py: every part of issue 24 in one call (8 minutes on an H200)
#       tests    CUDA-graph replay and the other GPU cases of the test suite
#       w768 | compiled | compiled-channels-last | w768x4   single benchmarks.suite runs
set -euo pipefail
part=${1:?usage: bash benchmarks/gpu.sh wheels [OFFICIAL]|check|tests|w768|compiled|compiled-channels-last|w768x4}
out=${OUT:-/tmp}
# What the image (torch 2.11 cu130, Python 3.12, onnx, onnxruntime, cupy, cuda-bindings) lacks: ftfy (the
# tokenizer imports it: a fallback would change token ids) and its wcwidth; polygraphy (the engine build's
# API, wrapped by the TensorRT double); onnxslim (exports are simplified). Their own needs are in the image.
wheels=(ftfy==6.3.1 wcwidth==0.2.13 polygraphy==0.53.6 onnxslim==0.1.98)
suite=(python3 -m benchmarks.suite --preset sd15-random --device cuda --precision fp16)

if [[ $part == wheels ]]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${wheels[@]}"
    if [[ -n ${2:-} ]]; then  # only the official sources (about 1 MB): its images and docs stay behind
        rm -rf .official && mkdir -p .official
        (cd "$2" && find flashface ldm -name '*.py' -print0 | xargs -0 cp --parents -t "$OLDPWD/.official")
    fi
    du -sh .whl .official 2>/dev/null
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
official=()
[[ -d .official/flashface ]] && official=(--official .official)
case $part in
    check) python3 -m benchmarks.gpu_check --json "$out/gpu_check.json" "${official[@]}" ;;
    tests) python3 -m pytest -q -rs -n 0 tests/test_static_step.py tests/test_torch_settings.py tests/test_engine.py ;;
    w768) "${suite[@]}" --variants auto,channels-last "${official[@]/--official/--official-src}" --json "$out/w768.json" ;;
    compiled | compiled-channels-last) "${suite[@]}" --variants "$part" --json "$out/w768-$part.json" ;;
    w768x4) "${suite[@]}" --samples 4 --variants auto --repeats 2 --json "$out/w768x4.json" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
esac
