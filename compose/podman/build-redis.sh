#!/bin/sh
# compose/podman/build-redis.sh: a minimal Redis image made on this machine, for hosts that cannot
# pull docker.io/library/redis:7-bookworm (no registry reachable, CI). compose/podman-compose.yml
# runs ASHMESH_REDIS_IMAGE (default the public image); set it to what this script builds.
#
#   compose/podman/build-redis.sh [IMAGE]          default IMAGE: localhost/ashmesh-redis:latest
#
# The rootfs holds this machine's redis-server (Debian: apt-get install redis-server) at
# /usr/local/bin/redis-server, where the public image has it, the shared libraries `ldd` lists
# for it, /etc/passwd and /etc/group with the user redis (999:999, as in the public image), /data
# (its working directory) and /tmp. No shell, no package manager. The image carries a label with
# the sha256 of its inputs; when it matches, nothing is rebuilt.
# Podman runs with CONTAINERS_CONF=compose/podman/containers.conf unless CONTAINERS_CONF is set.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
image=${1:-localhost/ashmesh-redis:latest}
: "${CONTAINERS_CONF:=$here/containers.conf}"
export CONTAINERS_CONF

redis_link=${REDIS_SERVER_BIN:-$(command -v redis-server || true)}
if [ -z "$redis_link" ] || [ ! -e "$redis_link" ]; then
  echo "build-redis: redis-server is not installed (apt-get install redis-server), or set REDIS_SERVER_BIN" >&2
  exit 1
fi
# Debian's redis-server is a link to redis-check-rdb: one binary that acts by the name it runs as.
# Copied as /usr/local/bin/redis-server, it runs as the server.
redis_bin=$(readlink -f "$redis_link")
for tool in ldd tar sha256sum podman; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-redis: $tool is needed and not on PATH" >&2; exit 1; }
done

# Every library the binary loads, as absolute paths (the vdso has none and is skipped).
libs=$(ldd "$redis_bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
if [ -z "$libs" ]; then
  echo "build-redis: ldd lists no library for $redis_bin (is it a static or foreign binary?)" >&2
  exit 1
fi

# shellcheck disable=SC2086 # $libs is a list of paths without spaces
inputs=$(sha256sum "$redis_bin" $libs "$0" | sha256sum | cut -c1-64)
current=$(podman image inspect --format '{{index .Labels "ashmesh.redis.inputs"}}' "$image" 2>/dev/null || true)
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
version=$("$redis_link" --version | sed -n 's/.* v=\([0-9.]*\) .*/\1/p')
if [ "$current" = "$inputs" ]; then
  echo "build-redis: $image is up to date (redis $version)"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ashmesh-redis.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
rootfs=$work/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/data"
chmod 1777 "$rootfs/tmp"
cp "$redis_bin" "$rootfs/usr/local/bin/redis-server"
chmod 0755 "$rootfs/usr/local/bin/redis-server"
for lib in $libs; do
  # Keep the path ldd resolved: the dynamic loader's path is written into the binary.
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done

cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
redis:x:999:999:redis:/data:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
redis:x:999:
nogroup:x:65534:
EOF
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
chown 999:999 "$rootfs/data" 2>/dev/null || true

tar --numeric-owner -C "$rootfs" -cf "$work/rootfs.tar" .
podman import \
  --change 'ENV=PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'USER=999:999' \
  --change 'WORKDIR=/data' \
  --change 'ENTRYPOINT=["/usr/local/bin/redis-server"]' \
  --change 'CMD=[]' \
  --change "LABEL=ashmesh.redis.inputs=$inputs" \
  --change "LABEL=ashmesh.redis.version=$version" \
  --quiet \
  --message "ashmesh redis: redis-server $version and its libraries" \
  "$work/rootfs.tar" "$image" >/dev/null
# The image this one replaces is left untagged: remove it unless a container still uses it.
[ -n "$previous" ] && podman rmi "$previous" >/dev/null 2>&1 || true
echo "build-redis: $image built (redis $version, $(echo "$libs" | wc -l) libraries)"
