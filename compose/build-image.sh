#!/bin/sh
# compose/build-image.sh: builds the ashmesh image (compose/Containerfile) from this checkout.
#
#   compose/build-image.sh [--base IMAGE] [--tag IMAGE]
#
#   --base  the FROM image (default docker.io/library/node:24-bookworm-slim; on a host without a
#           registry: localhost/ashmesh-base:latest from compose/podman/build-base.sh)
#   --tag   the image to build (default localhost/ashmesh:latest, what podman-compose.yml runs)
#   ASHMESH_BASE and ASHMESH_IMAGE set the same two.
#
# The context is prepared in a directory of its own, so nothing runs inside the image and the
# checkout's dist/ is neither needed nor changed: the sources compiled with tsconfig.build.json,
# package.json, compose/mesh.yaml, and the production dependencies of package-lock.json
# (`npm ci --omit=dev --ignore-scripts`, kept in .ashmesh/image-cache/ until the lock file changes).
# Podman runs with CONTAINERS_CONF=compose/podman/containers.conf unless CONTAINERS_CONF is set.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
base=${ASHMESH_BASE:-docker.io/library/node:24-bookworm-slim}
tag=${ASHMESH_IMAGE:-localhost/ashmesh:latest}
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=${2:?--base needs an image}; shift 2 ;;
    --base=*) base=${1#--base=}; shift ;;
    --tag) tag=${2:?--tag needs an image}; shift 2 ;;
    --tag=*) tag=${1#--tag=}; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
: "${CONTAINERS_CONF:=$here/podman/containers.conf}"
export CONTAINERS_CONF

for tool in npm podman sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-image: $tool is needed and not on PATH" >&2; exit 1; }
done
tsc=$root/node_modules/.bin/tsc
[ -x "$tsc" ] || { echo "build-image: $tsc is missing: run \`npm ci\` in $root first" >&2; exit 1; }

cache=$root/.ashmesh/image-cache
mkdir -p "$cache"
context=$(mktemp -d "$cache/context.XXXXXX")
trap 'rm -rf "$context"' EXIT INT TERM

# Production dependencies, once per package-lock.json.
lock=$(cat "$root/package.json" "$root/package-lock.json" | sha256sum | cut -c1-16)
modules=$cache/node_modules-$lock
if [ ! -d "$modules" ]; then
  staging=$(mktemp -d "$cache/npm.XXXXXX")
  cp "$root/package.json" "$root/package-lock.json" "$staging/"
  echo "build-image: npm ci --omit=dev --ignore-scripts (production dependencies)"
  flags="--omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error"
  # shellcheck disable=SC2086
  if ! (cd "$staging" && npm ci $flags 2>"$staging/npm-ci.err"); then
    # `npm ci` refuses a package-lock.json that is out of sync with package.json, even when only
    # dev or optional entries differ. Say so, and install the locked production versions anyway.
    sed -n '1,8p' "$staging/npm-ci.err" | sed 's/^/  /' >&2
    echo "build-image: npm ci refused (above); trying npm install $flags. Fix the lock file with \`npm install --package-lock-only\`" >&2
    # shellcheck disable=SC2086
    (cd "$staging" && rm -rf node_modules && npm install $flags --no-save) || {
      rm -rf "$staging"
      echo "build-image: npm install failed (is the npm registry or the npm cache reachable?)" >&2
      exit 1
    }
  fi
  # Another build may have made the same directory meanwhile: keep the first one.
  mv -T "$staging/node_modules" "$modules" 2>/dev/null || true
  rm -rf "$staging"
fi
cp -a "$modules" "$context/node_modules"

echo "build-image: compiling the sources (tsconfig.build.json)"
"$tsc" -p "$root/tsconfig.build.json" --outDir "$context/dist" --sourceMap false
cp "$root/package.json" "$context/"
mkdir -p "$context/compose"
cp "$root/compose/mesh.yaml" "$context/compose/"

previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
echo "build-image: podman build --build-arg BASE=$base -t $tag"
podman build --quiet --build-arg "BASE=$base" -f "$here/Containerfile" -t "$tag" "$context" >/dev/null ||
  {
    echo "build-image: podman build failed (FROM $base: pull it first, or build a local base with compose/podman/build-base.sh and pass --base localhost/ashmesh-base:latest)" >&2
    exit 1
  }
# The image this one replaces is left untagged: remove it unless a container still uses it.
current=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then podman rmi "$previous" >/dev/null 2>&1 || true; fi
echo "build-image: $tag built from $base"
