#!/bin/sh
# compose/podman/build-base.sh: a minimal base image made on this machine, for hosts that cannot
# pull docker.io/library/node:24-bookworm-slim (no registry reachable, CI).
#
#   compose/podman/build-base.sh [IMAGE]          default IMAGE: localhost/ashmesh-base:latest
#
# The rootfs holds Node's binary (the `node` devDependency, i.e. Node 24, or $NODE_BIN), the
# shared libraries `ldd` lists for it (libc, libstdc++, libgcc_s, libm, ld-linux ...), /etc/passwd
# and /etc/group with the non-root user ashmesh (10001:10001), /etc/nsswitch.conf and /tmp.
# No shell, no package manager: the Containerfile only copies files (compose/build-image.sh).
# The image carries a label with the sha256 of its inputs; when it matches, nothing is rebuilt.
# Podman runs with CONTAINERS_CONF=compose/podman/containers.conf unless CONTAINERS_CONF is set.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
image=${1:-localhost/ashmesh-base:latest}
: "${CONTAINERS_CONF:=$here/containers.conf}"
export CONTAINERS_CONF

node_link=${NODE_BIN:-$root/node_modules/node/bin/node}
if [ ! -e "$node_link" ]; then
  echo "build-base: no Node binary at $node_link: run \`npm ci\` (it installs the node devDependency) or set NODE_BIN" >&2
  exit 1
fi
node_bin=$(readlink -f "$node_link")
for tool in ldd tar sha256sum podman; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-base: $tool is needed and not on PATH" >&2; exit 1; }
done

# Every library the binary loads, as absolute paths (the vdso has none and is skipped).
libs=$(ldd "$node_bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
if [ -z "$libs" ]; then
  echo "build-base: ldd lists no library for $node_bin (is it a static or foreign binary?)" >&2
  exit 1
fi

# shellcheck disable=SC2086 # $libs is a list of paths without spaces
inputs=$(sha256sum "$node_bin" $libs "$0" | sha256sum | cut -c1-64)
current=$(podman image inspect --format '{{index .Labels "ashmesh.base.inputs"}}' "$image" 2>/dev/null || true)
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
if [ "$current" = "$inputs" ]; then
  echo "build-base: $image is up to date ($("$node_bin" --version))"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ashmesh-base.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
rootfs=$work/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/home/ashmesh"
chmod 1777 "$rootfs/tmp"
cp "$node_bin" "$rootfs/usr/local/bin/node"
chmod 0755 "$rootfs/usr/local/bin/node"
for lib in $libs; do
  # Keep the path ldd resolved (e.g. /lib/x86_64-linux-gnu/libc.so.6, /lib64/ld-linux-x86-64.so.2):
  # the dynamic loader's path is written into the binary.
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done

cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
ashmesh:x:10001:10001:ashmesh:/home/ashmesh:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
ashmesh:x:10001:
nogroup:x:65534:
EOF
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
chown -R 10001:10001 "$rootfs/home/ashmesh" 2>/dev/null || true

tar --numeric-owner -C "$rootfs" -cf "$work/rootfs.tar" .
podman import \
  --change 'ENV=PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'USER=10001:10001' \
  --change 'WORKDIR=/home/ashmesh' \
  --change 'CMD=["/usr/local/bin/node"]' \
  --change "LABEL=ashmesh.base.inputs=$inputs" \
  --change "LABEL=ashmesh.base.node=$("$node_bin" --version)" \
  --quiet \
  --message "ashmesh base: Node $("$node_bin" --version) and its libraries" \
  "$work/rootfs.tar" "$image" >/dev/null
# The image this one replaces is left untagged: remove it unless a container or image still uses it.
[ -n "$previous" ] && podman rmi "$previous" >/dev/null 2>&1 || true
echo "build-base: $image built ($("$node_bin" --version), $(echo "$libs" | wc -l) libraries)"
