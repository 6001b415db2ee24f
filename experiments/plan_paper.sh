#!/usr/bin/env bash
# `polca plan` of the paper presets on one H100, one H200 and 8 H100s (8x1 and 2x4): the figures in plan_check.md.
# The English corpus is only read for its shapes: any text with enough documents does (here the Lee corpus that
# gensim ships, repeated 20 times; the paper's Wikipedia needs the network). Usage: experiments/plan_paper.sh
set -euo pipefail
corpus=$(mktemp --suffix=.txt)
trap 'rm -f "$corpus"' EXIT
python - "$corpus" <<'PY'
import os, sys
import gensim
lee = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
documents = [line.strip() for line in open(lee, encoding="utf-8") if line.strip()]
open(sys.argv[1], "w", encoding="utf-8").write("\n\n".join(documents * 20))
PY
for task in arithmetic english; do
  settings=()
  [ "$task" = english ] && settings=(--set "data=$corpus")
  for plan in "h100 1x1" "h200 1x1" "h100 8x1" "h100 2x4"; do
    set -- $plan
    echo "== $task, preset paper, --device $1 --mesh $2"
    polca plan "$task" --preset paper --device "$1" --mesh "$2" "${settings[@]}"
  done
done
