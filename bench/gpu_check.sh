#!/usr/bin/env bash
# The GPU check (issues 15 and 22): prepared runs of < 8 minutes each on one GPU that append their
# numbers, with the device name, to bench/RESULTS.md. Run from the repository root:
#     bash bench/gpu_check.sh                          # issue 15's parts (the default PARTS)
#     PARTS="families zero3" bash bench/gpu_check.sh   # issue 22's: each family at full size
#     PARTS="search extract" bash bench/gpu_check.sh
# Parts (each under its own timeout; a failed part is recorded as failed and the rest go on):
#   train     bind (clap) and route epochs in bf16-mixed on data=world_medium (bench/stage_costs.py)
#   search    exact pair search 1M x 1M, dim 1024, on the GPU vs faiss (bench/gpu_search.py)
#   approx    the same, plus the pair stage's approximate indexes (ivf, hnsw) and their recall@1
#   extract   extract throughput, random open_clip ViT-L-14, bf16, vs a bare loop (gpu_extract.py)
#   deepspeed ZeRO-3 inference of the largest random open_clip model that fits (gpu_deepspeed.py)
#   ddp       bind on 2 GPUs with DDP and global negatives, only when the machine has 2 or more
#   families  extract throughput of wavcaps (audio), imagebind (audio, image), uni3d (point),
#             eva02_e (image) and clap (audio) at full size, random weights, bf16, vs a bare loop
#             (gpu_extract.py --families)
#   zero3     extract of EVA-CLIP-18B (encoders.eva_clip's 18B preset, random weights) under
#             trainer=deepspeed_infer (ZeRO-3) vs the plain bf16 module (gpu_extract.py --zero3)
# Nothing in CI runs this; every part's script answers --help on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
PARTS=${PARTS:-"train search extract deepspeed ddp"}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ -z "$GPU" ]; then echo "gpu_check: no GPU (nvidia-smi lists none)"; exit 1; fi
REPORT="$OUT/report.md"
{
  echo
  echo "## $(date -u +%F), ${GPU} x ${NGPU} (bench/gpu_check.sh)"
  echo
  echo "CPU: $(lscpu | grep 'Model name' | sed 's/Model name: *//'), $(nproc) cores."
  echo "torch $(python -c 'import torch; print(torch.__version__)'). Each part's command and output:"
} > "$REPORT"

part() {  # part NAME SECONDS COMMAND...: run under a timeout, append the tail of its output
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  {
    echo
    echo "### $name ($((SECONDS - start)) s, exit $rc)"
    echo
    echo '```'
    echo "\$ $*"
    tail -n 25 "$OUT/$name.log"
    echo '```'
  } >> "$REPORT"
  tail -n 3 "$OUT/$name.log"
}

MEDIUM="data=world_medium trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed"
for p in $PARTS; do
  case $p in
    train)
      part train 240 python bench/stage_costs.py --data world_medium --only world,bind,route \
        --out "$OUT/medium" -- trainer.accelerator=gpu trainer.devices=1 \
        trainer.precision=bf16-mixed bind.epochs=1 route.epochs=1 ;;
    search)
      part search 100 python bench/gpu_search.py --rows 1000000 --dim 1024 --faiss-queries 8192 ;;
    approx)  # exact on the GPU vs the pair stage's ivf and hnsw indexes, 1M x 1M (issue 26)
      part approx 400 python bench/gpu_search.py --rows 1000000 --dim 1024 --faiss-queries 8192 \
        --approx ivf,hnsw ;;
    extract)
      part extract 80 python bench/gpu_extract.py --model ViT-L-14 --images 1024 ;;
    deepspeed)
      part deepspeed 80 python bench/gpu_deepspeed.py ;;
    families)
      part families 300 python bench/gpu_extract.py --families --items 512 --repeats 1 ;;
    zero3)
      part zero3 240 python bench/gpu_extract.py --zero3 --items 256 --repeats 1 ;;
    ddp)
      if [ "$NGPU" -ge 2 ]; then
        part ddp 150 python train.py stage=bind space=clap $MEDIUM trainer=ddp trainer.devices=2 \
          bind.epochs=1 logger=none "paths.output_dir=$OUT/ddp"
      else
        echo "== ddp: skipped (1 GPU)"; printf '\n### ddp\n\nskipped: 1 GPU\n' >> "$REPORT"
      fi ;;
  esac
done
cat "$REPORT" >> bench/RESULTS.md
echo "appended $REPORT to bench/RESULTS.md"
