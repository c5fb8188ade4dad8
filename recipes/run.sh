#!/usr/bin/env bash
# One-shot recipe: prune -> mine RePAIR pairs -> train every row -> merge LoRA -> evaluate
# (a row with focus_teacher_cache builds that teacher cache from the folder's focus.yml first).
#
#   bash recipes/run.sh llama-3.1-8b            # 25% (p25); also p35 / p45 for llama-3.1-8b
#   bash recipes/run.sh llama-2-13b p25
#   ROWS="focus focus-repair dpo" bash recipes/run.sh llama-3.1-8b-instruct
#
# Run from the repository root, with the package installed (pip install -e '.[eval,deepspeed]').
# Every stage is resumable: the pruned checkpoint is cached, mining resumes from its JSONL,
# a row whose merged model exists is skipped, evaluation reuses saved generations.
# NGPU (default: all visible GPUs) processes are used for mining and training.
set -euo pipefail
MODEL=${1:?usage: bash recipes/run.sh MODEL [p25|p35|p45]}
TAG=${2:-p25}
DIR=recipes/$MODEL/$TAG
[ -d "$DIR" ] || { echo "no recipe folder $DIR" >&2; exit 2; }
export AXOLOTL_DO_NOT_TRACK=1
NGPU=${NGPU:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
PAIRS=pairs/$MODEL-$TAG.jsonl
TARGET_PAIRS=${TARGET_PAIRS:-12000}   # the paper mines 12k pairs (4k already suffice, appendix B)
ALL_ROWS=$(for f in "$DIR"/*.yml; do b=$(basename "$f" .yml); [ "$b" = prune ] || echo "$b"; done)
ROWS=${ROWS:-$ALL_ROWS}

echo "== 1/5 prune ($DIR/prune.yml)"
PRUNED=$(axolotl-focus prune "$DIR/prune.yml" | tee /dev/stderr | sed -n 's/^pruned checkpoint: //p')

echo "== 2/5 mine RePAIR pairs -> $PAIRS"
mkdir -p pairs
case "$MODEL" in
  *instruct) PROMPTS=(--mode instruction --prompts yahma/alpaca-cleaned --text-field instruction) ;;
  *) PROMPTS=(--mode open_ended --prompts Salesforce/wikitext --dataset-config wikitext-103-raw-v1
              --split train --prefix-tokens 50) ;;
esac
accelerate launch --num_processes "$NGPU" -m axolotl_focus.cli pairs --student "$PRUNED" "${PROMPTS[@]}" \
  --max-new-tokens 200 --top-p 0.9 --target-pairs "$TARGET_PAIRS" --output "$PAIRS"

echo "== 3/5 train, 4/5 merge LoRA: $(echo $ROWS)"
EVAL_MODELS=("teacher=$(python -c "from axolotl_focus.config import source_model_of as s; print(s('$PRUNED'))")"
             "pruned=$PRUNED")
for row in $ROWS; do
  out=outputs/$MODEL/$TAG/$row
  if [ ! -f "$out/merged/config.json" ]; then
    CACHE=$(sed -n 's/^focus_teacher_cache: //p' "$DIR/$row.yml")
    if [ -n "$CACHE" ]; then  # the teacher's top-k of the folder's focus.yml data (resumable; done: no-op)
      axolotl-focus teacher-cache "$DIR/focus.yml" --output "$CACHE" --k "${CACHE##*-k}"
    fi
    accelerate launch --num_processes "$NGPU" -m axolotl.cli.train "$DIR/$row.yml"
    axolotl merge-lora "$DIR/$row.yml"
  else
    echo "   $row: done ($out/merged)"
  fi
  EVAL_MODELS+=("$row=$out/merged")
done

echo "== 5/5 evaluate -> eval/$MODEL-$TAG"
case "$MODEL" in
  # the 252 Self-Instruct user-oriented instructions shipped with the package (references for
  # BERTScore); INSTRUCTIONS=FILE.jsonl for another prompt set (the hub copy yizhongw/self_instruct
  # is a loading-script dataset that datasets 4.x does not run)
  *instruct) TASKS=(--tasks instruction ${INSTRUCTIONS:+--instructions "$INSTRUCTIONS"}) ;;
  *) TASKS=(--tasks open_ended --documents Salesforce/wikitext --documents-config wikitext-103-raw-v1
            --ppl-data Salesforce/wikitext --ppl-config wikitext-103-raw-v1) ;;
esac
axolotl-focus eval "${EVAL_MODELS[@]}" "${TASKS[@]}" --output-dir "eval/$MODEL-$TAG"
