#!/usr/bin/env bash
# Submit the tokenization array (N tasks) and the index step that runs after all of them succeed.
#   MANIFEST=... SHARDS=... [TOKENIZER=...] launch/slurm/submit_shards.sh N
set -euo pipefail
n=${1:?usage: MANIFEST=... SHARDS=... $0 N_TASKS}
here=$(dirname "$0")
jid=$(sbatch --parsable --array=0-$((n - 1)) --export=ALL "$here/shards.sbatch")
sbatch --dependency=afterok:"$jid" --export=ALL,INDEX_ONLY=1 "$here/shards.sbatch"
echo "submitted array $jid ($n tasks) and its index step"
