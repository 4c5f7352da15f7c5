#!/usr/bin/env bash
# The checks CI cannot run, in one go on a CUDA machine, from the repository root:
#   1. the GPU tests (tests/test_cuda.py twice: as shipped, and with ACCESSORY_TRITON=1 so that the
#      quantized models' decode steps, CUDA graphs included, take quant/triton_rows.py's kernel;
#      then test_cuda_graphs.py and test_compiled_decode.py);
#   2. benchmarks/cuda_quant_rows.py --sweep (the Triton kernel's products and block sizes against
#      cuBLAS bf16, tinygemm and bitsandbytes);
#   3. benchmarks/cuda_decode.py on the 7B shape, bf16 and int8 / int4 / nf4, without and with
#      ACCESSORY_TRITON=1.
# Logs go to $OUT (else ./gpu-check-out). The tests need the tokenizer fixtures: set
# ACCESSORY_SHARED to a folder holding fixtures/tokenizers/{llama-spm,falcon} (a copy of
# ../shared's, when ../shared does not travel). bitsandbytes is used when importable.
# About 8 minutes on an H200 (give the device call its 600 s); each step has its own time limit, and a failing step does not stop
# the ones after it (the exit status says whether any failed).
set -uo pipefail
PY=${PY:-python3}
out=${OUT:-gpu-check-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
run() {  # run NAME SECONDS COMMAND...: the command's output to $out/NAME.log and the terminal
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -25
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}
nvidia-smi -L
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
pytest=("$PY" -m pytest -o addopts= -q -rs -p no:warnings -p no:cacheprovider)
run tests 150 "${pytest[@]}" tests/test_cuda.py tests/test_cuda_graphs.py tests/test_compiled_decode.py
run tests-triton 120 env ACCESSORY_TRITON=1 "${pytest[@]}" tests/test_cuda.py
run quant-rows 150 "$PY" benchmarks/cuda_quant_rows.py --sweep --best-to "$out/best-blocks.json"
run decode 150 "$PY" benchmarks/cuda_decode.py --shapes 7B --no-hf --new-tokens 32 --quant int8 int4 nf4
run decode-triton 150 env ACCESSORY_TRITON=1 "$PY" benchmarks/cuda_decode.py --shapes 7B --no-hf --new-tokens 32 \
    --quant int8 int4 nf4
exit $status
