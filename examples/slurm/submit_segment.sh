#!/bin/bash
# Submit a sharded segmentation and its merge: N array tasks, then merge-reports once they all succeeded.
#
#   INPUTS='/shared/scans/*.nii.gz' MODEL=/shared/models/confkd OUT=/shared/seg SHARDS=8 examples/slurm/submit_segment.sh
#
# Extra arguments go to every `confkd segment` (e.g. --tta --preview).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SHARDS=${SHARDS:-8}
: "${INPUTS:?set INPUTS}" "${MODEL:?set MODEL}" "${OUT:?set OUT}"
export INPUTS MODEL OUT SHARDS

array=$(sbatch --parsable --array="0-$((SHARDS - 1))" "$here/segment_array.sbatch" "$@")
merge=$(sbatch --parsable --dependency="afterok:${array%%;*}" "$here/merge_reports.sbatch")
echo "segment array job $array ($SHARDS tasks), merge job $merge: results in $OUT/merged"
