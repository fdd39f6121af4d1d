#!/bin/sh
# Start one Redis server of a Sentinel-managed group as whatever the sentinels say it is now.
#
# A fixed role would be wrong after a failover: the old primary, restarted as "primary", would
# accept writes beside the promoted replica, and the promoted replica, restarted as "replica",
# would follow a stale server. So the server asks the sentinels for the current primary first;
# it runs as primary only if that is itself, or if no sentinel answers and it is the bootstrap
# primary (the very first start of the group).
#
# Environment (compose: deploy/docker-compose.sentinel.yml; Kubernetes: deploy/k8s-sentinel/):
#   REDIS_PASSWORD              this server's password, and the one it replicates with
#   FLAGSHIP_SENTINEL_PASSWORD  the sentinels' password
#   SENTINEL_HOSTS              the sentinels, "host[:port] host[:port] ..." (default port 26379)
#   FLAGSHIP_SENTINEL_MASTER    the name they monitor the primary under (default mymaster)
#   ANNOUNCE_HOST               the name others reach this server by (its DNS name)
#   BOOTSTRAP_PRIMARY           host[:port] of the primary before any failover
#   REDIS_PORT                  this server's port (default 6379)
#   REDIS_DIR                   data directory (default /data)
set -eu
port="${REDIS_PORT:-6379}"
master="${FLAGSHIP_SENTINEL_MASTER:-mymaster}"

ask_sentinels() {
  for sentinel in $SENTINEL_HOSTS; do
    host="${sentinel%%:*}"
    sport="${sentinel#*:}"; [ "$sport" = "$sentinel" ] && sport=26379
    reply=$(redis-cli -h "$host" -p "$sport" -a "$FLAGSHIP_SENTINEL_PASSWORD" --no-auth-warning \
      sentinel get-master-addr-by-name "$master" 2>/dev/null | tr '\n' ' ') || reply=""
    # shellcheck disable=SC2086  # split on purpose: "host port"
    set -- $reply
    if [ "$#" -eq 2 ]; then
      echo "$1:$2"
      return 0
    fi
  done
  return 1
}

primary=$(ask_sentinels) || primary=""
if [ -z "$primary" ]; then
  primary="$BOOTSTRAP_PRIMARY"
  case "$primary" in *:*) ;; *) primary="$primary:6379" ;; esac
  echo "redis-start: no sentinel knows the primary yet; bootstrap primary $primary"
else
  echo "redis-start: the sentinels name $primary as the primary"
fi

set -- --port "$port" --dir "${REDIS_DIR:-/data}" --appendonly yes --appendfsync everysec --save "" \
  --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD" \
  --replica-announce-ip "$ANNOUNCE_HOST" --replica-announce-port "$port"
if [ "$primary" != "$ANNOUNCE_HOST:$port" ]; then
  set -- "$@" --replicaof "${primary%%:*}" "${primary##*:}"
fi
exec redis-server "$@"
