#!/usr/bin/env bash
# The GPU session behind docs/results.md and the GPU rows of docs/performance.md: run by the device tool from the
# repository root, with the compact ACDC copy (benchmarks/compact_dataset.py --uncompressed, then tar -cJf) in
# .devdata/acdc.tar.xz and a nibabel wheel in .whl/. Results land in $OUT (at most 8 files come back: ablation.log, ablation.tar.gz,
# four stripped checkpoints, bench_gpu.json).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.log 2>&1; then
    stamp "pip install -e failed; using a copied package tree"
    mkdir -p /tmp/pkg && cp -r confkd /tmp/pkg/ && cp -r cli /tmp/pkg/confkd/cli && cp -r export /tmp/pkg/confkd/export
    export PYTHONPATH=/tmp/pkg:/tmp/site
fi
mkdir -p /tmp/d && tar -C /tmp/d -xJf .devdata/acdc.tar.xz
nvidia-smi 2>&1 | tee "$OUT/ablation.log"
python3 -c "import torch, confkd, nibabel; print(torch.__version__, torch.cuda.get_device_name(0), confkd.__file__)"
stamp "setup done"
# ONLY: comma-separated run names (default: all 17); EXTRA: extra "--set key=value" arguments for every run
python3 benchmarks/acdc_ablation.py /tmp/d/acdc --out /tmp/abl --device cuda --budget-s "${BUDGET_S:-360}" \
    --calibrate-steps "${CALIBRATE:-40}" --only "${ONLY:-}" ${EXTRA:-} \
    --fallback-set train.amp=off --fallback-set train.channels_last=false 2>&1 | tee -a "$OUT/ablation.log"
stamp "ablation done"
python3 benchmarks/acdc_ablation.py --out /tmp/abl --strip ${STRIP:-n7-confkd n3-confkd n3-decoupled n7-decoupled} --to "$OUT"
tar -C /tmp -czf "$OUT/ablation.tar.gz" --exclude='*.pt' --exclude='manifest.json' abl
stamp "packed"
[ "${BENCH_S:-100}" = 0 ] && { stamp "all done"; exit 0; }
mkdir -p /tmp/val && for p in $(seq 71 85); do ln -s /tmp/d/acdc/imagesTr/patient0${p}_* /tmp/val/; done
timeout "${BENCH_S:-100}" python3 benchmarks/run.py --quick --device cuda --volumes-from /tmp/val \
    --out "$OUT/bench_gpu.json" 2>&1
stamp "all done"
