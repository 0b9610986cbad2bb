#!/usr/bin/env bash
# Type stubs for TensorRT (its runtime cannot be installed here): tensorrt-stubs without its
# `tensorrt` dependency, copied to ./typings with four fixes (see docs/tensorrt.md).
set -euo pipefail
cd "$(dirname "$0")/.."
version=10.13.0.35.1
tmp=$(mktemp -d)
python3 -m pip download --quiet --disable-pip-version-check --no-deps "tensorrt-stubs==${version}" -d "$tmp"
python3 -m zipfile -e "$tmp"/tensorrt_stubs-*.whl "$tmp/x"
rm -rf typings && mkdir -p typings
cp -r "$tmp/x/tensorrt" "$tmp/x/tensorrt_bindings" typings/
# 1. parameters named `in` (a Python keyword); 2. a non-default parameter after defaulted ones;
# 3. an import of `tensorrt_libs`, which the stubs do not ship;
sed -E -i 's/([(,] ?)in: /\1in_: /g' typings/tensorrt_bindings/tensorrt.pyi typings/tensorrt/__init__.pyi
sed -E -i 's/(def add_scale_nd\(.*, )channel_axis: int\)/\1channel_axis: int = ...)/' typings/tensorrt_bindings/tensorrt.pyi
sed -i '/tensorrt_libs/d' typings/tensorrt/__init__.pyi
# 4. `import tensorrt as trt; trt.Builder` needs explicit re-exports in a stub (`X as X`)
sed -E -i 's/\r$//; s/^from (tensorrt_bindings[.a-z_]*) import ([A-Za-z_0-9]+)$/from \1 import \2 as \2/' typings/tensorrt/__init__.pyi
rm -rf "$tmp"
echo "TensorRT ${version} stubs in typings/"
