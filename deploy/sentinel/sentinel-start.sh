#!/bin/sh
# Start one Redis Sentinel of the group that watches the flagship broker.
#
# Sentinel rewrites its config file as it learns (the current primary, the replicas, the other
# sentinels, the epoch), so the file lives on the sentinel's volume and is written only once:
# a restarted sentinel keeps what it learned. A sentinel starting without it asks its peers for
# the current primary, so one that lost its volume does not revive a primary that was failed over.
#
# Environment (compose: deploy/docker-compose.sentinel.yml; Kubernetes: deploy/k8s-sentinel/):
#   FLAGSHIP_SENTINEL_PASSWORD  this sentinel's password (requirepass), and its peers'
#   REDIS_PASSWORD              the primary's and the replicas' password
#   SENTINEL_HOSTS              every sentinel of the group, "host[:port] ..." (default port 26379)
#   FLAGSHIP_SENTINEL_MASTER    the name the primary is monitored under (default mymaster)
#   SENTINEL_QUORUM             sentinels that must agree the primary is down (default 2)
#   SENTINEL_DOWN_AFTER_MS      silence after which a sentinel thinks it down (default 5000)
#   ANNOUNCE_HOST               the name others reach this sentinel by (its DNS name)
#   BOOTSTRAP_PRIMARY           host[:port] of the primary before any failover
#   SENTINEL_PORT               this sentinel's port (default 26379)
#   SENTINEL_CONFIG             its config file (default /data/sentinel.conf)
set -eu
port="${SENTINEL_PORT:-26379}"
master="${FLAGSHIP_SENTINEL_MASTER:-mymaster}"
config="${SENTINEL_CONFIG:-/data/sentinel.conf}"

ask_peers() {
  for sentinel in $SENTINEL_HOSTS; do
    host="${sentinel%%:*}"
    sport="${sentinel#*:}"; [ "$sport" = "$sentinel" ] && sport=26379
    [ "$host:$sport" = "$ANNOUNCE_HOST:$port" ] && continue
    reply=$(redis-cli -h "$host" -p "$sport" -a "$FLAGSHIP_SENTINEL_PASSWORD" --no-auth-warning \
      sentinel get-master-addr-by-name "$master" 2>/dev/null | tr '\n' ' ') || reply=""
    # shellcheck disable=SC2086  # split on purpose: "host port"
    set -- $reply
    if [ "$#" -eq 2 ]; then
      echo "$1 $2"
      return 0
    fi
  done
  return 1
}

if [ ! -s "$config" ]; then
  primary=$(ask_peers) || primary=""
  if [ -z "$primary" ]; then
    case "$BOOTSTRAP_PRIMARY" in *:*) primary="${BOOTSTRAP_PRIMARY%%:*} ${BOOTSTRAP_PRIMARY##*:}" ;;
      *) primary="$BOOTSTRAP_PRIMARY 6379" ;; esac
  fi
  echo "sentinel-start: writing $config, monitoring $master at $primary"
  mkdir -p "$(dirname "$config")"
  cat > "$config" <<CONF
port $port
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $ANNOUNCE_HOST
sentinel announce-port $port
requirepass $FLAGSHIP_SENTINEL_PASSWORD
sentinel sentinel-pass $FLAGSHIP_SENTINEL_PASSWORD
sentinel monitor $master $primary ${SENTINEL_QUORUM:-2}
sentinel auth-pass $master $REDIS_PASSWORD
sentinel down-after-milliseconds $master ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout $master 60000
sentinel parallel-syncs $master 1
CONF
fi
exec redis-sentinel "$config"
