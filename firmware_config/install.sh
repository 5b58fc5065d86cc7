#!/usr/bin/env bash
# Install edge-retrieval on a Raspberry Pi / Jetson as a hardened systemd service.
#
#   sudo bash install.sh --config device.toml [--bundle DIR] [--credentials FILE] [--ca FILE]
#                        [--public-key FILE] [--from SRC] [--enable] [--dry-run]
#
# Steps: check a 64-bit OS and Python >= 3.10; apt packages; the `edge-retrieval` system user;
# a venv in /opt/edge-retrieval/venv with `edge-retrieval[mic]` (never the export extra on a
# device); the config and secrets in /etc/edge-retrieval (root:edge-retrieval, 0640); the bundle
# in /opt/edge-retrieval/bundles; `edge-retrieval config check`; `edge-retrieval install-service`.
# --dry-run prints every step without changing anything (and works without root).
set -euo pipefail

PREFIX=/opt/edge-retrieval
ETC=/etc/edge-retrieval
SVC_USER=edge-retrieval
CONFIG="" BUNDLE="" CREDS="" CA="" PUBKEY="" SRC="" ENABLE=0 DRY=0 APT=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
    --bundle) BUNDLE="${2:?--bundle needs a directory}"; shift 2 ;;
    --credentials) CREDS="${2:?--credentials needs a file}"; shift 2 ;;
    --ca) CA="${2:?--ca needs a file}"; shift 2 ;;
    --public-key) PUBKEY="${2:?--public-key needs a file}"; shift 2 ;;
    --from) SRC="${2:?--from needs a path or requirement}"; shift 2 ;;
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --user) SVC_USER="${2:?--user needs a name}"; shift 2 ;;
    --enable) ENABLE=1; shift ;;
    --no-apt) APT=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$CONFIG" ] || die "--config FILE is required (start from firmware_config/example-device.toml)"
[ -f "$CONFIG" ] || die "config $CONFIG does not exist"
[ -z "$BUNDLE" ] || [ -f "$BUNDLE/manifest.json" ] || die "bundle $BUNDLE has no manifest.json (make it with: edge-retrieval bundle slim)"
for f in "$CREDS" "$CA" "$PUBKEY"; do [ -z "$f" ] || [ -f "$f" ] || die "file $f does not exist"; done
if [ -z "$SRC" ]; then
  # the source tree this script sits in (firmware_config/..), else the published package
  if [ -f "$HERE/../pyproject.toml" ]; then SRC="$(cd "$HERE/.." && pwd)"; else SRC="edge-retrieval"; fi
fi

# ---- platform: 64-bit userland (a 32-bit Raspberry Pi OS may run a 64-bit kernel) and Python
MACHINE="${EDGE_RETRIEVAL_TEST_MACHINE:-$(uname -m)}"   # override only for the installer's own tests
BITS="${EDGE_RETRIEVAL_TEST_LONG_BIT:-$(getconf LONG_BIT)}"
case "$MACHINE" in
  armv6l|armv7l|armv8l|i386|i686) BITS=32 ;;
esac
if [ "$BITS" != 64 ]; then
  die "this is a 32-bit system ($MACHINE, ${BITS}-bit userland); edge-retrieval needs a 64-bit OS because onnxruntime publishes no 32-bit ARM wheels: flash Raspberry Pi OS (64-bit)"
fi
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || die "$PY not found (install python3 >= 3.10)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "Python >= 3.10 is required, found $("$PY" -c 'import platform; print(platform.python_version())')"
echo "install.sh: platform ok: $MACHINE, 64-bit, $("$PY" -c 'import platform; print("Python", platform.python_version())')"

if [ "$DRY" = 0 ] && [ "$(id -u)" -ne 0 ]; then die "run as root (sudo bash install.sh ...), or add --dry-run"; fi

run() {  # print every step; execute unless --dry-run
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

VENV="$PREFIX/venv"
BIN="$VENV/bin/edge-retrieval"
DEVCFG="$ETC/device.toml"

# ---- system packages: venv, PortAudio for the microphone
if [ "$APT" = 1 ]; then
  NEED=""
  for p in python3-venv libportaudio2 libsndfile1; do dpkg -s "$p" >/dev/null 2>&1 || NEED="$NEED $p"; done
  if [ -n "$NEED" ]; then
    run apt-get update -qq
    # shellcheck disable=SC2086
    run apt-get install -y --no-install-recommends $NEED
  fi
fi

# ---- the service user: no login, no home outside its state directory, in the audio group
if ! id "$SVC_USER" >/dev/null 2>&1; then
  run useradd --system --user-group --home-dir /var/lib/edge-retrieval --no-create-home \
      --shell /usr/sbin/nologin "$SVC_USER"
fi
run usermod -a -G audio "$SVC_USER"

# ---- the venv and the package (runtime + microphone; the export extra stays on the workstation)
run install -d -m 0755 "$PREFIX" "$PREFIX/bundles"
[ -x "$VENV/bin/python" ] || run "$PY" -m venv "$VENV"
run "$VENV/bin/python" -m pip install -q --upgrade pip
run "$VENV/bin/python" -m pip install -q "$SRC[mic]"   # a source tree, a wheel, or a requirement

# ---- bundle, config and secrets
if [ -n "$BUNDLE" ]; then
  run rm -rf "$PREFIX/bundles/$(basename "$BUNDLE")"
  run cp -r "$BUNDLE" "$PREFIX/bundles/$(basename "$BUNDLE")"
  run chmod -R a+rX "$PREFIX/bundles/$(basename "$BUNDLE")"
fi
run install -d -m 0750 -o root -g "$SVC_USER" "$ETC" "$ETC/tls"
run install -m 0640 -o root -g "$SVC_USER" "$CONFIG" "$DEVCFG"
[ -z "$CREDS" ] || run install -m 0640 -o root -g "$SVC_USER" "$CREDS" "$ETC/mqtt-credentials"
[ -z "$CA" ] || run install -m 0644 -o root -g "$SVC_USER" "$CA" "$ETC/tls/ca.pem"
[ -z "$PUBKEY" ] || run install -m 0644 -o root -g "$SVC_USER" "$PUBKEY" "$ETC/query-signing.pub.pem"

# ---- check, then the unit
run "$BIN" config check "$DEVCFG"
run "$BIN" install-service --config "$DEVCFG" --exec "$BIN" --user "$SVC_USER"
if [ "$ENABLE" = 1 ]; then
  run systemctl daemon-reload
  run systemctl enable --now edge-retrieval
  echo "install.sh: started; follow it with: journalctl -u edge-retrieval -f"
else
  echo "install.sh: done; start it with: sudo systemctl daemon-reload && sudo systemctl enable --now edge-retrieval"
fi
