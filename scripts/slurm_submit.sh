#!/bin/bash
# Submit a sharded collection as a Slurm array and a merge job that runs once every shard has ended:
#   scripts/slurm_submit.sh NUM_SHARDS OUTPUT [collect_rollouts overrides ...]
#   scripts/slurm_submit.sh 8 results/rollouts.jsonl input_jsonl_fpath=prompts.jsonl agent_name=my_agent \
#       num_repeats=4 'headers.Authorization=Bearer ${oc.env:AGENT_TOKEN}'
# Prints the two job ids. The merge job (--dependency=afterany: a shard that finished with some rollouts failed
# for good exits 3, and its recorded failures count as accounted for) checks the shards' manifests and
# coverage and writes OUTPUT with its metrics. If a task was stopped before it finished, the merge refuses,
# naming what is missing (logs/merge_<id>.out): resubmit that task (same arguments, `--array=K`), then the merge.
# SBATCH_PARTITION, SBATCH_ACCOUNT, ... (sbatch's environment variables) choose where both jobs run.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_SHARDS OUTPUT [collect_rollouts overrides ...]" >&2
  exit 2
fi
shards=$1 output=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p logs "$(dirname "$output")"
last=$((shards - 1))
width=$(( ${#last} > 2 ? ${#last} : 2 ))  # shard names are zero-padded as collect_rollouts writes them
pattern="${output%.*}_shard-*-of-$(printf "%0${width}d" "$shards").${output##*.}"
array=$(sbatch --parsable --array="0-$((shards - 1))" "$here/slurm_array.sbatch" "output_jsonl_fpath=$output" "$@")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterany:$array" --job-name=merge_rollouts --ntasks=1 \
  --cpus-per-task=1 --time=02:00:00 --output="logs/merge_%j.out" \
  --wrap="merge_rollouts -o '$output' $pattern")
echo "array job $array ($shards shards), merge job ${merge%%;*} -> $output"
