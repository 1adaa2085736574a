#!/bin/sh
# Writes the node's config from the environment, then runs rabbitmq-server in the foreground.
set -eu
: "${RABBITMQ_DEFAULT_USER:?set RABBITMQ_DEFAULT_USER}"
: "${RABBITMQ_DEFAULT_PASS:?set RABBITMQ_DEFAULT_PASS}"
[ "$RABBITMQ_DEFAULT_USER" != guest ] || { echo "refusing the guest user" >&2; exit 1; }
conf=/var/lib/rabbitmq/rabbitmq.conf
umask 077
cat >"$conf" <<CONF
listeners.tcp.default = 5672
default_user = $RABBITMQ_DEFAULT_USER
default_pass = $RABBITMQ_DEFAULT_PASS
default_vhost = /
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
log.console = true
log.console.level = info
log.file = false
CONF
export RABBITMQ_CONFIG_FILE=$conf
unset RABBITMQ_DEFAULT_PASS
exec rabbitmq-server "$@"
