#!/usr/bin/env bash
# Issue 12's long-context measurement: the same training budget (the demo's, 24,576 tokens) for
# each variant, Pride and Prejudice streamed to its end (167,891 tokens), passkey retrieval, and
# today's 1k-window protocol; then the results page. Run on a quiet machine, one job at a time.
# Usage: bash scripts/long_context.sh [RUNS_DIR] [STREAM_TOKENS]   (defaults: runs/long_context, all)
set -euo pipefail
RUNS=${1:-runs/long_context}
TOKENS=${2:+--tokens $2}
L="${LINEARIZE:-.venv/bin/linearize}"
R="$RUNS/results"
# 1. train: augmented (the defaults), its local-only ablation, plain elu
$L train --attention augmented --stage both --lora --out "$RUNS/augmented"
$L train --attention augmented --option use_global=false --stage both --lora --out "$RUNS/local"
$L train --attention elu --stage finetune --lora --out "$RUNS/elu"
# 2. perplexity by position, the novel streamed (the original: windows of its 8,192 positions)
$L eval ppl --model smollm2-135m --data prideprejudice --stream $TOKENS --json --out "$R"
$L eval ppl --model smollm2-135m --attention sliding_window --option size=256 --data prideprejudice \
    --stream $TOKENS --json --out "$R"
for m in augmented local elu; do
    $L eval ppl --model "$RUNS/$m/model" --data prideprejudice --stream $TOKENS --json --out "$R"
done
# 3. passkey (the original stops at its 8,192 positions: longer lengths are skipped, said so)
$L eval passkey --model smollm2-135m --lengths 1024,4096,8192 --json --out "$R"
$L eval passkey --model "$RUNS/augmented/model" --lengths 1024,4096,8192,16384,32768 --json --out "$R"
# 4. today's protocol: 1k windows of the Austen eval slice
$L eval ppl --model "$RUNS/augmented/model" --data austen:eval --json --out "$R"
$L bench report --results "$R" --page "$RUNS/results.md"
