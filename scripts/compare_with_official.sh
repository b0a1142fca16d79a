#!/usr/bin/env bash
# Run OpenAI's official GPT-2 code and this project on the same prompt, both greedy, and diff the results.
#
#   scripts/compare_with_official.sh PROMPT [N_TOKENS] [MODEL]
#
# Builds the Dockerfile's `official` and `app` stages, runs each on PROMPT for N_TOKENS tokens (default 40)
# with MODEL (default 124M), prints a unified diff, and exits 0 only when the two continuations are identical.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
  echo "usage: $0 PROMPT [N_TOKENS] [MODEL]" >&2
  exit 2
fi
prompt=$1
n_tokens=${2:-40}
model=${3:-124M}

cd "$(dirname "$0")/.."
docker build --quiet --target official --build-arg MODEL="$model" --tag "gpt2-official:$model" . >&2
docker build --quiet --target app --tag gpt2-numpy . >&2

official=$(mktemp)
ours=$(mktemp)
trap 'rm -f "$official" "$ours"' EXIT

docker run --rm "gpt2-official:$model" "$prompt" "$n_tokens" >"$official"
docker run --rm --volume gpt2-models:/app/models gpt2-numpy \
  --prompt="$prompt" --n_tokens_to_generate "$n_tokens" --model_size "$model" >"$ours"

if diff -u --label "openai/gpt-2 ($model, top_k=1)" --label "gpt2.py ($model, greedy)" "$official" "$ours"; then
  echo "identical: $n_tokens tokens of $model" >&2
else
  exit 1
fi
