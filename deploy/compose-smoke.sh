#!/usr/bin/env bash
# End-to-end check of deploy/compose.yml under podman-compose:
#   build the images (cached: seconds when nothing changed), `up -d` with N workers, wait for the
#   gateway (bounded), send chat completions through it, check every answer has content, look at
#   Prometheus's targets, then `down -v` and check that no container, volume or network is left.
# Prints the time each image took, the time to a ready mesh, and requests sent/answered.
# Exits non-zero on any failure. Environment (defaults):
#   EXEGPT_WORKERS=2  SMOKE_REQUESTS=8  SMOKE_MAX_TOKENS=16  SMOKE_READY_TIMEOUT_S=420
#   SMOKE_REQUEST_TIMEOUT_S=300  EXEGPT_PROJECT=exegpt-smoke  EXEGPT_GATEWAY_PORT=8000
#   EXEGPT_PROMETHEUS_PORT=9090  SKIP_BUILD=1 (use the images as they are when all exist)
#   KEEP=1 (leave the mesh up; then: podman-compose -p $EXEGPT_PROJECT -f deploy/compose.yml down -v)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export EXEGPT_PROJECT=${EXEGPT_PROJECT:-exegpt-smoke}
export EXEGPT_WORKERS=${EXEGPT_WORKERS:-2}
export EXEGPT_GATEWAY_PORT=${EXEGPT_GATEWAY_PORT:-8000}
export EXEGPT_PROMETHEUS_PORT=${EXEGPT_PROMETHEUS_PORT:-9090}
export EXEGPT_MODEL=${EXEGPT_MODEL:-smollm2}
N=${SMOKE_REQUESTS:-8}
MAX_TOKENS=${SMOKE_MAX_TOKENS:-16}
READY_TIMEOUT_S=${SMOKE_READY_TIMEOUT_S:-420}
REQUEST_TIMEOUT_S=${SMOKE_REQUEST_TIMEOUT_S:-300}
PROJECT=$EXEGPT_PROJECT
GW=http://127.0.0.1:$EXEGPT_GATEWAY_PORT
PROM=http://127.0.0.1:$EXEGPT_PROMETHEUS_PORT
IMAGES=(localhost/exegpt-base:bookworm localhost/exegpt:latest localhost/exegpt-rabbitmq:latest
        localhost/exegpt-redis:latest localhost/exegpt-prometheus:latest)

# fresh secrets for this run (hex: safe inside URLs)
secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
export EXEGPT_API_KEYS=${EXEGPT_API_KEYS:-$(secret)}
export EXEGPT_RABBITMQ_PASS=${EXEGPT_RABBITMQ_PASS:-$(secret)}
export EXEGPT_REDIS_PASS=${EXEGPT_REDIS_PASS:-$(secret)}
API_KEY=${EXEGPT_API_KEYS%%,*}

ensure_tools
ensure_compose
compose() { timeout "${COMPOSE_TIMEOUT_S:-600}" podman-compose -p "$PROJECT" -f "$DEPLOY_DIR/compose.yml" "$@"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
leftovers() {
  local f="label=io.podman.compose.project=$PROJECT"
  {
    podman ps -a --filter "$f" --format 'container {{.Names}}'
    podman ps -a --filter "name=^${PROJECT}_" --format 'container {{.Names}}'
    podman volume ls --filter "$f" --format 'volume {{.Name}}'
    podman volume ls --format 'volume {{.Name}}' | grep "^volume ${PROJECT}_" || true
    podman network ls --filter "$f" --format 'network {{.Name}}'
    podman network ls --format 'network {{.Name}}' | grep "^network ${PROJECT}_" || true
  } | sort -u
}

# --- images --------------------------------------------------------------------------------------
missing=0
for img in "${IMAGES[@]}"; do podman image exists "$img" || missing=1; done
if [ "${SKIP_BUILD:-0}" = 1 ] && [ $missing = 0 ]; then
  log "SKIP_BUILD=1: using the existing images"
else
  "$DEPLOY_DIR/build-images.sh"
fi

# --- up ------------------------------------------------------------------------------------------
[ -z "$(leftovers)" ] || die "project $PROJECT already has: $(leftovers | tr '\n' ' ') (down it first)"
for p in "$EXEGPT_GATEWAY_PORT" "$EXEGPT_PROMETHEUS_PORT"; do
  port_open "$p" && die "127.0.0.1:$p is in use (set EXEGPT_GATEWAY_PORT / EXEGPT_PROMETHEUS_PORT)"
done

STATUS=1
teardown() {
  local rc=$STATUS
  if [ $rc != 0 ]; then
    log "failure: the last lines of each container's log"
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      echo "----- $c ($(podman inspect -f '{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}}' "$c" 2>/dev/null))"
      podman logs --tail 25 "$c" 2>&1 | sed 's/^/  /'
    done
  fi
  if [ "${KEEP:-0}" = 1 ]; then log "KEEP=1: the mesh stays up"; exit $rc; fi
  log "down"
  local t0=$SECONDS
  compose down -v --remove-orphans >/tmp/exegpt-smoke-down.log 2>&1 || { log "podman-compose down failed:"; tail -20 /tmp/exegpt-smoke-down.log >&2; rc=1; }
  log "down took $((SECONDS - t0)) s"
  local left; left=$(leftovers)
  if [ -n "$left" ]; then
    log "left after down: $(echo "$left" | tr '\n' ' ')"; rc=1
    # do not leave them behind either way
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" -q | xargs -r podman rm -f -t 5 >/dev/null 2>&1 || true
    podman volume ls --filter "label=io.podman.compose.project=$PROJECT" -q | xargs -r podman volume rm -f >/dev/null 2>&1 || true
    podman network ls --filter "label=io.podman.compose.project=$PROJECT" -q | xargs -r podman network rm -f >/dev/null 2>&1 || true
  else
    echo "down: nothing left (podman ps -a / volume ls / network ls for project $PROJECT are empty)"
  fi
  [ $rc = 0 ] && echo "SMOKE OK" || echo "SMOKE FAILED"
  exit $rc
}
trap teardown EXIT

log "up -d: project $PROJECT, $EXEGPT_WORKERS workers, gateway on $GW"
T_UP=$SECONDS
compose up -d >/tmp/exegpt-smoke-up.log 2>&1 || { tail -30 /tmp/exegpt-smoke-up.log >&2; die "podman-compose up"; }
podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '  {{.Names}}  {{.Status}}'

# --- ready: the gateway's health route, then a first answer through the mesh -------------------
deadline=$((T_UP + READY_TIMEOUT_S))
health=""  # /health/ready when the gateway has it (200 only once workers are up), else /health
until [ -n "$health" ]; do
  code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$GW/health/ready" 2>/dev/null || true)
  if [ "$code" = 200 ]; then health=/health/ready
  elif [ "$code" = 404 ] && curl -fsS -m 5 -o /dev/null "$GW/health" 2>/dev/null; then health=/health
  fi
  [ -n "$health" ] && break
  [ $SECONDS -lt $deadline ] || die "the gateway's /health/ready (or /health) did not answer 200 within ${READY_TIMEOUT_S}s (last: ${code:-none})"
  sleep 2
done
T_HEALTH=$((SECONDS - T_UP))
log "gateway $health answered ${T_HEALTH}s after up"

chat() {  # prints the answer's content; non-zero without content
  curl -fsS -m "$1" "$GW/v1/chat/completions" -H 'content-type: application/json' \
    -H "authorization: Bearer $API_KEY" \
    -d "{\"model\": \"$EXEGPT_MODEL\", \"max_tokens\": $MAX_TOKENS, \"temperature\": 0, \"messages\": [{\"role\": \"user\", \"content\": \"$2\"}]}" |
    python3 -c 'import json,sys; c=json.load(sys.stdin)["choices"][0]["message"]["content"]; assert c.strip(), "empty content"; print(c)'
}
# the first completion also waits for a worker to load the model and join the schedule
until first=$(chat 60 "Say hello." 2>/dev/null); do
  [ $SECONDS -lt $deadline ] || die "no completion answered within ${READY_TIMEOUT_S}s of up"
  sleep 3
done
T_READY=$((SECONDS - T_UP))
log "first completion ${T_READY}s after up: $(echo "$first" | head -c 80)"

# --- the smoke requests: N at once -------------------------------------------------------------
log "sending $N chat completions (max_tokens $MAX_TOKENS) at once"
T_REQ=$SECONDS
python3 - "$GW" "$API_KEY" "$N" "$MAX_TOKENS" "$REQUEST_TIMEOUT_S" "$EXEGPT_MODEL" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
gw, key, n, max_tokens, timeout, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
             "Give one word for happy.", "What do bees make?", "Name a planet.",
             "What language is spoken in Spain?", "What is water made of?"]
def ask(i):
    body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": questions[i % len(questions)]}]}).encode()
    req = urllib.request.Request(gw + "/v1/chat/completions", body, {
        "content-type": "application/json", "authorization": "Bearer " + key})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            reply = json.load(r)
        content = reply["choices"][0]["message"]["content"]
        ok = bool(content and content.strip())
        return ok, time.monotonic() - t0, content if ok else "EMPTY: " + json.dumps(reply)[:200]
    except Exception as e:  # noqa: BLE001 - reported, counted as unanswered
        return False, time.monotonic() - t0, f"ERROR: {e!r}"[:200]
with ThreadPoolExecutor(n) as pool:
    results = list(pool.map(ask, range(n)))
for i, (ok, dt, text) in enumerate(results):
    print(f"  [{i}] {'ok ' if ok else 'BAD'} {dt:6.2f}s  {text!r}"[:160])
answered = sum(ok for ok, _, _ in results)
print(f"requests sent/answered: {n}/{answered}")
sys.exit(0 if answered == n else 1)
PY
T_REQ=$((SECONDS - T_REQ))

# --- persistence and monitoring (reported) -----------------------------------------------------
redis_c=$(podman ps --filter "name=^${PROJECT}_redis_" --format '{{.Names}}' | head -1)
[ -n "$redis_c" ] && log "redis: $(podman exec "$redis_c" redis-cli info persistence | tr -d '\r' | grep -E '^aof_enabled' || echo 'aof_enabled: ?')"
gateway_up=0
for _ in $(seq 1 15); do  # prometheus scrapes every 5 s
  targets=$(curl -fsS -m 5 "$PROM/api/v1/targets" 2>/dev/null || true)
  [ -n "$targets" ] && echo "$targets" | python3 -c 'import json,sys; t=json.load(sys.stdin)["data"]["activeTargets"]; sys.exit(0 if any(x["labels"]["job"]=="gateway" and x["health"]=="up" for x in t) else 1)' && { gateway_up=1; break; }
  sleep 2
done
echo "prometheus targets:"
TARGETS_JSON=${targets:-} python3 - <<'PY'
import json, os
try:
    t = json.loads(os.environ["TARGETS_JSON"])["data"]["activeTargets"]
except Exception:
    t = []
for x in sorted(t, key=lambda x: (x["labels"]["job"], x["labels"]["instance"])):
    job, inst = x["labels"]["job"], x["labels"]["instance"]
    print(f"  {job:10} {inst:24} {x['health']:8} {x.get('lastError', '')[:70]}")
print(f"  ({len(t)} targets)")
PY
[ $gateway_up = 1 ] || die "prometheus does not scrape the gateway"

echo "containers (restarts: services started before the broker answered exit and are restarted):"
podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' |
  while read -r c; do echo "  $c $(podman inspect -f '{{.State.Status}} restarts={{.RestartCount}}' "$c")"; done
echo "time to ready mesh: gateway $health ${T_HEALTH} s, first completion ${T_READY} s after up"
echo "requests: $N sent at once, all answered in ${T_REQ} s"
STATUS=0
