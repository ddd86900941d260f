#!/bin/bash
# Every section of experiments/gpu.py in order, each a plain command under its own time limit; then gpu_report.py.
#     bash experiments/gpu.sh OUT            # one GPU: about 8 minutes on an H100 (each section's seconds below),
#                                            # and about 4 more (estimated) for full-depth
#     bash experiments/gpu.sh OUT --tiny     # a CPU, tiny sizes, every section end to end: minutes on 2 cores
# OUT gets each section's SECTION.json as it ends, then gpu.json and gpu.md, and log.txt (everything printed). A
# section that fails or runs out of time leaves a note in the report and the next one starts. Cut short from
# outside, `python -m experiments.gpu_report --out OUT` reports what finished.
# On a bare GPU machine (torch, transformers, accelerate, peft), diffusers, ftfy (HPS's prompt cleaning) and
# bitsandbytes (--quantize-base nf4; its wheel is 43 MB) travel as wheels in .whl/ (where there is a network:
# `python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64
#  --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 ftfy wcwidth bitsandbytes==0.50.2`):
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 bash experiments/gpu.sh $OUT
set -u
OUT=$1
TINY=${2:-}
M=$(mktemp -d /tmp/srpo-gpu-models.XXXXXX)  # the models, gigabytes: not in OUT
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
section() { timeout "$1" python -m experiments.gpu "$2" --models "$M" --out "$OUT" $TINY; }

section 150 models        # 28 s on the H100 (each with the process's start)
section 150 train-fsdp    # 22 s
section 150 train-ddp     # 24 s
section 150 train-lora    # 22 s
section 150 anatomy       # 24 s
section 120 rollout       # 28 s
section 120 sample        # 26 s
section 150 stability     # 27 s
section 300 bench         # 216 s
section 600 full-depth    # FLUX.1-dev's 19 + 38 blocks, LoRA on a bf16 and an nf4 base: about 4 min, estimated
python -m experiments.gpu_report --out "$OUT"  # with the memory plan, computed on the CPU: 15 s
rm -rf "$M"
