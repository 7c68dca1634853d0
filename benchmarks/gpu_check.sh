#!/usr/bin/env bash
# What a CUDA GPU changes for fedlt, checked on one (CI has no GPU, so this is run by hand where one is lent).
#
# 1. Every test that needs no Ray (`-m "not e2e"`): the in-process federations among them run the real
#    ServerApp and ClientApp with device=auto, so every method's client hooks, payloads and precisions
#    run on the GPU (with the clip and regl extras importable, the CLIP methods and ReGL's generation and
#    LoRA too); unit tests that build CPU tensors themselves stay on the CPU. Every UserWarning is shown,
#    and those about determinism are counted: an op with no deterministic CUDA kernel warns there.
# 2. The plain loop (benchmarks/plain_loop.py) on the converged protocol's setting (Fashion-MNIST-LT,
#    10 clients, 1 epoch, batch 64), FedAvg and RedGrape in fp32, bf16 and fp16, clients on the GPU:
#    per-round times and accuracies, and FedAvg fp32 twice, to see whether a GPU run repeats to the digit.
#
#     benchmarks/gpu_check.sh OUTDIR                          # python3 with torch (CUDA) and fedlt importable
#     PYTHON=.venv/bin/python benchmarks/gpu_check.sh OUTDIR  # another interpreter
#
# Writes OUTDIR/machine.txt, pytest.log, junit.xml, plain.jsonl (the plain loop's rows, each tagged with its
# method, precision and run) and plain.err (their logs).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
PY=${PYTHON:-python3}  # the interpreter with torch (CUDA) and fedlt importable, e.g. PYTHON=.venv/bin/python
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

"$PY" - > "$out/machine.txt" 2>&1 <<'EOF'
import platform, torch, flwr
print("python", platform.python_version(), "torch", torch.__version__, "flwr", flwr.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("bf16 native", torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
EOF
cat "$out/machine.txt"
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: $PY sees no CUDA device; nothing to check here" >&2
    exit 2
fi

parallel=()  # pytest-xdist where it is installed (WORKERS=0: one process)
if [ "${WORKERS:-8}" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "${WORKERS:-8}"); fi
OMP_NUM_THREADS=2 timeout "${PYTEST_SECONDS:-330}" "$PY" -m pytest -q -m "not e2e" "${parallel[@]}" -p no:cacheprovider -rfE \
    -W "always::UserWarning" --junitxml="$out/junit.xml" > "$out/pytest.log" 2>&1
echo "pytest exit $?"; tail -n 25 "$out/pytest.log"
echo "warnings about determinism:"; grep -i "determinis" "$out/pytest.log" | sort | uniq -c

setting="dataset='fmnist' model='cnn' imbalance-profile='exp' imbalance-ratio=100.0 partition='dirichlet'
dirichlet-alpha=1.0 clients-per-round=0 local-epochs=1 batch-size=64 local-lr=0.05 momentum=0.9 grad-clip=1.0
num-server-rounds=${ROUNDS:-4} device='cuda'"
plain() {  # METHOD PRECISION RUN
    timeout 150 "$PY" benchmarks/plain_loop.py --num-clients 10 \
        --run-config "$setting method='$1' precision='$2'" 2>> "$out/plain.err" |
        sed "s/^{/{\"method\": \"$1\", \"precision\": \"$2\", \"run\": $3, /" | tee -a "$out/plain.jsonl"
    echo "plain $1 $2 run $3: exit ${PIPESTATUS[0]}"
}
for method in fedavg redgrape; do
    for precision in fp32 bf16 fp16; do
        plain "$method" "$precision" 1
    done
done
plain fedavg fp32 2
