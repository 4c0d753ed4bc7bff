#!/usr/bin/env bash
# Submit the tokenization: the tokenizer fit (embedded tokenizer only), the array of N tasks after it,
# and the index step after all of them succeed.
#   INPUT='...' SHARDS=... [TOKENIZER=...] launch/slurm/submit_shards.sh N
set -euo pipefail
n=${1:?usage: INPUT=... SHARDS=... $0 N_TASKS}
here=$(dirname "$0")
after=()
if [ "${TOKENIZER:-patch-kmeans}" = "patch-kmeans" ]; then
  fit=$(sbatch --parsable --export=ALL,FIT_ONLY=1 "$here/shards.sbatch")
  after=(--dependency=afterok:"$fit")
fi
jid=$(sbatch --parsable "${after[@]}" --array=0-$((n - 1)) --export=ALL "$here/shards.sbatch")
sbatch --dependency=afterok:"$jid" --export=ALL,INDEX_ONLY=1 "$here/shards.sbatch"
echo "submitted array $jid ($n tasks) and its index step"
