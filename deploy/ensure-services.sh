#!/usr/bin/env bash
# Make sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer on loopback.
# Starts them if installed but stopped; installs them from Debian packages if missing.
# Both are bound to 127.0.0.1 only. Exits non-zero if either still does not answer.
# Also makes sure of the dashboard's test browser (ensure-browser.sh); without it only those
# tests fail (under CI) or skip, so its failure is a warning here.
# A Redis started here keeps its data in an append-only file (fsync every second) under
# $EXEGPT_REDIS_DATA_DIR (default /var/lib/exegpt-redis), so batch files, batches and results
# survive a restart (at most ~1 s of writes is lost on a crash). A Redis already running is left
# as it is (the gateway warns at start when it persists nothing).
set -u

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, seconds
  local i
  for ((i = 0; i < $2; i++)); do port_open "$1" && return 0; sleep 1; done
  return 1
}

need_install=()
port_open 6379 || command -v redis-server >/dev/null || need_install+=(redis-server)
port_open 5672 || command -v rabbitmq-server >/dev/null || need_install+=(rabbitmq-server)
if ((${#need_install[@]})); then
  echo "ensure-services: installing ${need_install[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_install[@]}" >/dev/null
fi

if ! port_open 6379; then
  redis_dir=${EXEGPT_REDIS_DATA_DIR:-/var/lib/exegpt-redis}
  echo "ensure-services: starting redis-server on 127.0.0.1:6379 (append-only file in $redis_dir)" >&2
  mkdir -p "$redis_dir" && chmod 700 "$redis_dir"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir "$redis_dir" \
    --appendonly yes --appendfsync everysec --save "" --logfile /tmp/exegpt-redis.log
fi
if ! port_open 5672; then
  echo "ensure-services: starting rabbitmq-server on 127.0.0.1:5672" >&2
  mkdir -p /etc/rabbitmq
  if [ ! -s /etc/rabbitmq/rabbitmq.conf ]; then
    printf 'listeners.tcp.default = 127.0.0.1:5672\nmanagement.tcp.ip = 127.0.0.1\n' >/etc/rabbitmq/rabbitmq.conf
  fi
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1
  rabbitmq-server -detached >/dev/null 2>&1
fi

bash "$(dirname "$0")/ensure-browser.sh" || echo "ensure-services: no chromium: the dashboard's browser tests cannot run" >&2

ok=0
wait_port 6379 30 || { echo "ensure-services: Redis does not answer on 127.0.0.1:6379" >&2; ok=1; }
wait_port 5672 90 || { echo "ensure-services: RabbitMQ does not answer on 127.0.0.1:5672" >&2; ok=1; }
exit $ok
