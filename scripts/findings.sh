#!/usr/bin/env bash
# Reproduce the documented findings: `anchor-lens analyze` on the default model for the four
# paper tasks (200 queries each) and on Gemma 3 270M for SST-2 (100), from ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATA:-../shared/data}
OUT=${OUT:-runs/analyze}
N=${N:-200}
run() { .venv/bin/anchor-lens analyze --quiet --n "$N" --seed 42 "$@"; }
run --task sst2 --data $D/sst2/validation.jsonl --demo-data $D/sst2/train.jsonl --out $OUT/sst2
run --task agnews --data $D/ag_news/validation.jsonl --demo-data $D/ag_news/train.jsonl --out $OUT/agnews
run --task emoc --data $D/emo/validation.jsonl --demo-data $D/emo/train.jsonl --out $OUT/emoc
run --task trec --data $D/trec/train.jsonl --out $OUT/trec  # one split: demos from the rest
# Gemma 3 is ~4x slower per example on a CPU: 100 queries.
.venv/bin/anchor-lens analyze --quiet --n 100 --seed 42 --model gemma3-270m --task sst2 \
  --data $D/sst2/validation.jsonl --demo-data $D/sst2/train.jsonl --out $OUT/gemma-sst2
