#!/usr/bin/env bash
# Fuzz the gateway's OpenAPI document with schemathesis: every operation, generated bodies and
# parameters, the default checks (no server error, responses and status codes as documented,
# schema-valid requests accepted, schema-violating ones refused).
# Starts `exegpt serve --model tiny-llama` (max_tokens capped at 8, so generated requests stay
# short) on a free port, runs schemathesis from its own virtualenv (created on first use, so the
# project's environment is untouched), and stops the server. Extra arguments go to schemathesis.
#   bash scripts/api-fuzz.sh                 # 30 examples per operation
#   bash scripts/api-fuzz.sh -n 100
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SCHEMATHESIS_VENV:-/tmp/exegpt-schemathesis}
[ -x "$VENV/bin/schemathesis" ] || { python -m venv "$VENV" && "$VENV/bin/pip" install -q schemathesis; }
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp)
EXEGPT_MAX_TOKENS_LIMIT=8 exegpt serve --model tiny-llama --port "$PORT" --threads 1 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 1
done
"$VENV/bin/schemathesis" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$PORT/openapi.json" -n 30 "$@"
