#!/usr/bin/env bash
# The wheels benchmarks/gpu-device.sh installs on a GPU machine that has python 3.12, torch, transformers, peft,
# lightning, accelerate and tensorboard but none of these. Written to .whl/ (git-ignored), 64 MiB in all at
# most with the working tree, so bitsandbytes keeps only its CPU library and the one for torch's CUDA
# (cuda130 for the torch 2.11+cu130 there; BNB_CUDA=132 for another).
#
#   bash benchmarks/gpu-wheels.sh     # then: ls -l .whl
#
# Sizes on 2026-12-04: bitsandbytes (cpu + cuda130 only) 3.4 MiB, deepspeed 2.1, pydantic-core 2.2, trl 0.9,
# typeshed-client 0.8, datasets 0.6, pydantic 0.5, jsonargparse 0.2, the rest under 0.2 each: 11 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${BNB_CUDA:-130}
mkdir -p .whl
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$@"
}
get bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 \
    docstring-parser==0.18.0 typeshed-client==2.15.0 trl==1.16.0 hjson==3.1.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8   # an sdist: a pure-Python wheel, ops built on use
# bitsandbytes ships a library for every CUDA and ROCm release (41 MiB): keep the CPU one and torch's CUDA's.
wheel=$(ls .whl/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && python3 -m zipfile -e "$OLDPWD/$wheel" . && find bitsandbytes -name 'libbitsandbytes_*.so' \
    ! -name libbitsandbytes_cpu.so ! -name "libbitsandbytes_cuda$cuda.so" -delete \
    && grep -v -E 'libbitsandbytes_' bitsandbytes-*.dist-info/RECORD >RECORD.new \
    && mv RECORD.new bitsandbytes-*.dist-info/RECORD && rm "$OLDPWD/$wheel" && python3 -m zipfile -c "$OLDPWD/$wheel" *)
rm -rf "$tmp"
du -ch .whl/*.whl | tail -1
