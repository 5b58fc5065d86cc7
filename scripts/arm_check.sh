#!/usr/bin/env bash
# The device path on aarch64 under user-mode emulation (qemu-aarch64-static), against this x86 host.
#
#   bash scripts/arm_check.sh [options] [BUNDLE ...]
#
# Builds (once) a Debian bookworm arm64 userland with Python 3.11 and an aarch64 site-packages of
# the device install (`edge-retrieval[mic]`, aarch64 wheels only), installs this tree as a wheel,
# then for each BUNDLE (fp32 and any int8 variant; default: the one `edge-retrieval demo` builds):
#   1. `edge-retrieval bundle verify BUNDLE` under emulation;
#   2. `edge-retrieval run --source REC --query ... --json` under emulation and on the host,
#      events compared (a slim bundle has no text side: the recording itself is the query);
#   3. parity of every expert (front end + every ONNX output) on the same windows of real
#      recordings, aarch64 vs this host (python -m edge_retrieval.benchmarks.arm_parity).
# Exit 0 only when every step passes (1: a check failed, 2: bad usage, 3: --no-build and no cache). Emulated times mean nothing for a board: none are reported.
#
# onnxruntime is pinned to 1.26.0 here ONLY: 1.28 and newer die at import (SIGSEGV) under Debian
# 12's qemu-user 7.2, with any -cpu model; 1.26 runs the whole check. A Pi installs the newest one.
#
# Options:
#   --cache DIR      userland + wheels (default $EDGE_RETRIEVAL_ARM_CACHE or ~/.cache/edge-retrieval/arm64)
#   --out DIR        work files and reports (default CACHE/last-run, emptied first)
#   --sounds DIR     real recordings, <category>/<clip>.wav (default ~/.cache/edge-retrieval/sounds)
#   --windows N      parity windows per expert (default 48)
#   --recording F    the daemon's input (default: a bird clip of the sounds folder)
#   --cpu MODEL      emulated CPU (default cortex-a72 = Pi 4; cortex-a76 = Pi 5, has int8 dot product).
#                    Not 'max': its SVE makes onnxruntime's kernels ~17x slower to emulate.
#   --parity-only    skip verify and the daemon run
#   --no-build       exit 3 instead of building a missing userland or site (what the test uses)
# Needs: qemu-user-static, debootstrap (first run only; Debian packages), network to the Debian
# archive and PyPI on the first run. First run ~2-3 min of downloads, then cached.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${EDGE_RETRIEVAL_ARM_CACHE:-$HOME/.cache/edge-retrieval/arm64}
OUT=""
SOUNDS=${EDGE_RETRIEVAL_SOUNDS:-$HOME/.cache/edge-retrieval/sounds}
WINDOWS=48
RECORDING=""
PARITY_ONLY=0
CPU=${QEMU_CPU:-cortex-a72}
NO_BUILD=0
BUNDLES=()
PYVER=3.11
ORT_PIN=1.26.0
SUITE=bookworm
MIRROR=${EDGE_RETRIEVAL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOSTPY=${HOSTPY:-$REPO/.venv/bin/python}

die() { echo "arm_check: error: $*" >&2; exit 2; }
no_cache() { echo "arm_check: no cache: $*" >&2; exit 3; }  # --no-build and nothing built: exit 3
while [ $# -gt 0 ]; do
  case "$1" in
    --cache) CACHE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --sounds) SOUNDS=$2; shift 2 ;;
    --windows) WINDOWS=$2; shift 2 ;;
    --recording) RECORDING=$2; shift 2 ;;
    --cpu) CPU=$2; shift 2 ;;
    --parity-only) PARITY_ONLY=1; shift ;;
    --no-build) NO_BUILD=1; shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) BUNDLES+=("$1"); shift ;;
  esac
done
[[ "$WINDOWS" =~ ^[1-9][0-9]*$ ]] || die "--windows '$WINDOWS' is not a positive integer"
if [ ${#BUNDLES[@]} -eq 0 ]; then
  BUNDLES=("${EDGE_RETRIEVAL_BUNDLE_CACHE:-$HOME/.cache/edge-retrieval/bundles}/birdnet")
fi
for b in "${BUNDLES[@]}"; do
  [ -f "$b/manifest.json" ] || die "bundle '$b' has no manifest.json (build one: edge-retrieval export birdnet --out DIR)"
done
[ -x "$HOSTPY" ] || die "host python '$HOSTPY' not found (run scripts/setup.sh, or set HOSTPY)"
QEMU=$(command -v qemu-aarch64-static || true)
[ -n "$QEMU" ] || { [ "$NO_BUILD" = 1 ] && no_cache "qemu-aarch64-static not found"; die "qemu-aarch64-static not found (apt-get install qemu-user-static)"; }
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=${OUT:-$CACHE/last-run}
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/.arm_check" ]; then
  die "--out '$OUT' is a non-empty folder that arm_check did not make; give a new or empty one"
fi
rm -rf "$OUT" && mkdir -p "$OUT" && touch "$OUT/.arm_check"
OUT=$(cd "$OUT" && pwd)
T0=$SECONDS
step() { echo "== [$((SECONDS - T0)) s] $*"; }

# ---------------------------------------------------------------- userland
ROOT=$CACHE/rootfs-$SUITE
if [ ! -f "$ROOT/.complete" ]; then
  [ "$NO_BUILD" = 0 ] || no_cache "no arm64 userland at $ROOT (run scripts/arm_check.sh once without --no-build)"
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  step "building the arm64 userland ($SUITE, python$PYVER) in $ROOT"
  rm -rf "$ROOT.tmp" && mkdir -p "$ROOT.tmp"
  # --foreign: download and unpack without running arm64 code (no binfmt_misc here);
  # dpkg-deb -x then unpacks every downloaded package, which is all a python needs.
  debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python$PYVER,libsndfile1,libportaudio2,ca-certificates \
    "$SUITE" "$ROOT.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed (log: $CACHE/debootstrap.log)"
  for d in "$ROOT.tmp"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$d" "$ROOT.tmp"; done
  rm -f "$ROOT.tmp"/var/cache/apt/archives/*.deb
  touch "$ROOT.tmp/.complete"
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
fi
[ -x "$ROOT/usr/bin/python$PYVER" ] || die "$ROOT has no usr/bin/python$PYVER"

# ---------------------------------------------------------------- aarch64 wheels of the device install
# The requirement list is the project's own (pyproject dependencies + the mic extra), onnxruntime pinned.
REQS=$OUT/requirements-arm64.txt
"$HOSTPY" - "$REPO/pyproject.toml" "$ORT_PIN" > "$REQS" <<'EOF'
import re, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
for r in p["dependencies"] + p["optional-dependencies"]["mic"]:
    name = re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower()
    print(f"onnxruntime=={sys.argv[2]}" if name == "onnxruntime" else r)
EOF
KEY=$(sha256sum "$REQS" | cut -c1-12)
SITE=$CACHE/site-cp${PYVER/./}-$KEY
if [ ! -f "$SITE/.complete" ]; then
  [ "$NO_BUILD" = 0 ] || no_cache "no aarch64 site-packages at $SITE for these requirements (run scripts/arm_check.sh once without --no-build)"
  step "installing aarch64 wheels into $SITE"
  rm -rf "$SITE.tmp"
  "$HOSTPY" -m pip install -q --no-warn-conflicts --disable-pip-version-check --target "$SITE.tmp" \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform linux_aarch64 \
    --python-version "$PYVER" --implementation cp --only-binary=:all: -r "$REQS" 2> "$CACHE/pip.log" \
    || { grep -v "is ignored" "$CACHE/pip.log" >&2; die "aarch64 wheels did not install (log: $CACHE/pip.log)"; }
  touch "$SITE.tmp/.complete"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
fi

# ---------------------------------------------------------------- this tree, as a wheel
step "building this tree's wheel (tracked + untracked, not ignored files)"
mkdir -p "$OUT/src" "$OUT/dist"
git ls-files -co --exclude-standard -z | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
  | tar --null -T - -cf - | tar -xf - -C "$OUT/src"
"$HOSTPY" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check -w "$OUT/dist" "$OUT/src" \
  > "$OUT/wheel.log" 2>&1 || { cat "$OUT/wheel.log" >&2; die "could not build this tree's wheel"; }
"$HOSTPY" -m pip install -q --no-deps --disable-pip-version-check --target "$OUT/project" "$OUT"/dist/edge_retrieval-*.whl
rm -rf "$OUT/src"

# arm <args>: python3.11 on aarch64 with the installed wheel and its deps, nothing from the host's
# site; run from $OUT so that the source tree's edge_retrieval/ cannot shadow the wheel.
arm() {
  (cd "$OUT" && env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8 PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH="$OUT/project:$SITE" EDGE_RETRIEVAL_ORT_CACHE="$OUT/ort-cache" QEMU_CPU="$CPU" \
    "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python$PYVER" "$@")
}
# the console script exactly as pip would make it, found through the wheel's entry point
CLI='import sys; from importlib.metadata import entry_points
(ep,) = entry_points(group="console_scripts", name="edge-retrieval"); sys.argv[0] = "edge-retrieval"; sys.exit(ep.load()())'
echo "arm64 side: qemu-aarch64 -cpu $CPU, userland $ROOT"
arm -c 'import platform, numpy, onnxruntime; print("arm64 side:", platform.machine(), "python", platform.python_version(),
"numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__)' 2> >(grep -v "cpuid_info warning" >&2)

if [ -z "$RECORDING" ]; then
  # the longest bird recording of the fixture: several windows, and events to compare
  RECORDING=$("$HOSTPY" -c 'import sys, pathlib, soundfile as sf
fs = sorted(pathlib.Path(sys.argv[1]).glob("bird/*.wav"))
print(max(fs, key=lambda f: (sf.info(str(f)).frames / sf.info(str(f)).samplerate, str(f))) if fs else "")' "$SOUNDS")
fi
QUERIES=("a bird singing" "a dog barking" "an engine running")
status=0
for B in "${BUNDLES[@]}"; do
  B=$(cd "$B" && pwd)
  name=$(basename "$B")
  W=$OUT/$name && mkdir -p "$W"
  if [ "$PARITY_ONLY" = 0 ]; then
    step "$name: edge-retrieval bundle verify (aarch64)"
    arm -c "$CLI" bundle verify "$B" --json > "$W/verify-arm64.json" 2> "$W/verify-arm64.err" \
      || { cat "$W/verify-arm64.err" >&2; echo "FAIL $name: bundle verify on aarch64"; status=1; }
    "$HOSTPY" - "$W/verify-arm64.json" <<'EOF' || status=1
import json, sys
s = json.load(open(sys.argv[1]))
ex = ", ".join(f"{c['expert']} ran, output {c['output']}" for c in s["checks"]["experts"])
tx = ", ".join(f"{t['expert']}: {t['probe']!r} -> {t['top']!r}" for t in s["checks"]["text"]) or "none (slim)"
print(f"   {s['name']}: OK on aarch64; experts: {ex}; text: {tx}")
EOF

    if [ -z "$RECORDING" ] || [ ! -f "$RECORDING" ]; then
      echo "FAIL $name: no recording for the daemon run (--recording FILE)"; status=1
    else
      qargs=()
      if "$HOSTPY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("server") else 1)' "$B/manifest.json"; then
        for q in "${QUERIES[@]}"; do qargs+=(--query "$q"); done
      else  # slim bundle (what a device gets): no text side, so the recording's own vector is the query
        qargs=(--query-audio "$RECORDING")
      fi
      step "$name: edge-retrieval run --source $(basename "$RECORDING") ${qargs[*]:0:2} ... (aarch64, then host)"
      arm -c "$CLI" run --bundle "$B" --source "$RECORDING" "${qargs[@]}" --json --threads 1 \
        > "$W/events-arm64.jsonl" 2> "$W/run-arm64.err" \
        || { tail -3 "$W/run-arm64.err" >&2; echo "FAIL $name: daemon run on aarch64"; status=1; }
      EDGE_RETRIEVAL_ORT_CACHE=off "$REPO/.venv/bin/edge-retrieval" run --bundle "$B" --source "$RECORDING" \
        "${qargs[@]}" --json --threads 1 > "$W/events-x86.jsonl" 2> "$W/run-x86.err" \
        || { tail -3 "$W/run-x86.err" >&2; echo "FAIL $name: daemon run on the host"; status=1; }
      "$HOSTPY" - "$W/events-x86.jsonl" "$W/events-arm64.jsonl" <<'EOF' || status=1
import json, sys
def events(path):
    out = []
    for line in open(path, encoding="utf-8"):
        e = json.loads(line)
        out.append((e["query"], e["start_s"], e["end_s"], e["score"]))
    return out
x, a = events(sys.argv[1]), events(sys.argv[2])
same = [(p[:3] == q[:3]) for p, q in zip(x, a)]
dscore = max((abs(p[3] - q[3]) for p, q in zip(x, a)), default=0.0)
print(f"   events: host {len(x)}, aarch64 {len(a)}; same query and times: {sum(same)}/{max(len(x), len(a))}; max |score diff| {dscore:.3g}")
for e in a:
    print(f"     aarch64 event: {e[0]!r} {e[1]}-{e[2]} s score {e[3]}")
sys.exit(0 if len(x) == len(a) and all(same) else 1)
EOF
    fi
  fi

  step "$name: parity windows ($WINDOWS per expert) and host outputs"
  "$HOSTPY" -m edge_retrieval.benchmarks.arm_parity windows --bundle "$B" --sounds "$SOUNDS" --count "$WINDOWS" --out "$W/windows.npz"
  "$HOSTPY" -m edge_retrieval.benchmarks.arm_parity outputs --bundle "$B" --windows "$W/windows.npz" --out "$W/outputs-x86.npz"
  step "$name: outputs on aarch64 (emulated)"
  arm -m edge_retrieval.benchmarks.arm_parity outputs --bundle "$B" --windows "$W/windows.npz" --out "$W/outputs-arm64.npz" \
    2> >(grep -v "cpuid_info warning" >&2)
  step "$name: compare"
  "$HOSTPY" -m edge_retrieval.benchmarks.arm_parity compare "$W/outputs-x86.npz" "$W/outputs-arm64.npz" \
    --json "$W/parity.json" || status=1
done
step "done: $([ $status = 0 ] && echo PASS || echo FAIL); reports under $OUT"
exit $status
