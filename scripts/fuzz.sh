#!/usr/bin/env bash
# Builds and runs a libFuzzer target (Fuzz/*.swift) with AddressSanitizer:
#
#   scripts/fuzz.sh TARGET [RUNS] [libFuzzer options...]     TARGET: elf, events, texts or all
#
# RUNS (default 10000) executions from a seed corpus made of real files (a compiled program and
# object, a recorded trace, process and symbol files, -A/-R specs); the corpus grows under
# .build-fuzz/corpus-TARGET and is kept between runs. A crash leaves its input in
# .build-fuzz/crash-TARGET-*; copy it into Fuzz/Regressions/TARGET/ with a name that says what it broke
# (the regression tests read every file there).
# CI runs each target briefly (scripts/test.sh does not; .ci/run does): a long run is e.g.
# `scripts/fuzz.sh all 1000000`.
set -euo pipefail
# A crash must not wait for the Swift runtime's interactive backtracer.
export SWIFT_BACKTRACE=enable=no
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh elf|events|texts|all [RUNS] [libFuzzer options...]}
runs=${2:-10000}
shift $(( $# >= 2 ? 2 : 1 ))
work=.build-fuzz
mkdir -p "$work"

if [ "$target" = all ]; then
  for one in elf events texts; do "$0" "$one" "$runs" "$@"; done
  exit 0
fi

case "$target" in
  elf) sources=(Sources/TraceryELF/*.swift) ;;
  events | texts) sources=(Sources/TraceryRecord/*.swift) ;;
  *) echo "unknown target $target (elf, events, texts, all)" >&2; exit 2 ;;
esac
source_file="Fuzz/$(echo "${target:0:1}" | tr a-z A-Z)${target:1}.swift"
[ "$target" = elf ] && source_file=Fuzz/ELF.swift
binary="$work/fuzz-$target"
# TraceryRecord imports the C header tracery.h (the event word's layout) as module CTracery, and
# CTraceryShims.h for an inline system call (nothing of shims.c is linked).
mkdir -p "$work/include"
printf 'module CTracery {\n  header "%s"\n  export *\n}\nmodule CTraceryShims {\n  header "%s"\n  export *\n}\n' \
  "$PWD/Sources/CTracery/include/tracery.h" "$PWD/Sources/CTraceryShims/include/CTraceryShims.h" \
  > "$work/include/module.modulemap"
if [ ! -x "$binary" ] || [ -n "$(find "${sources[@]}" "$source_file" Sources/CTracery Sources/CTraceryShims/include \
  -newer "$binary" | head -1)" ]; then
  echo "== building $binary"
  swiftc -sanitize=fuzzer,address -parse-as-library -O -enforce-exclusivity=unchecked -I "$work/include" \
    "${sources[@]}" "$source_file" -o "$binary" 2> "$work/build-$target.log" || {
      cat "$work/build-$target.log" >&2
      exit 1
    }
fi

# Seeds from real files, once.
corpus="$work/corpus-$target"
if [ ! -d "$corpus" ]; then
  mkdir -p "$corpus"
  seeds="$work/seeds"
  mkdir -p "$seeds"
  printf '__attribute__((noinline)) int leaf(int x){return x*3+1;}\nint main(int c,char**v){return leaf(c);}\n' > "$seeds/seed.c"
  case "$target" in
    elf)
      clang -O2 -fpatchable-function-entry=5 -c "$seeds/seed.c" -o "$corpus/seed.o"
      clang -O2 -fpatchable-function-entry=5 "$seeds/seed.c" -o "$corpus/seed"
      gcc -O1 -pg -mfentry -mnop-mcount -mrecord-mcount -fno-pie -no-pie "$seeds/seed.c" -o "$corpus/seed-mcount"
      strip -o "$corpus/seed-stripped" "$corpus/seed"
      ;;
    events)
      swift build --product tracery >/dev/null
      clang -O2 -pthread -fpatchable-function-entry=5 Examples/demo/demo.c -o "$seeds/demo"
      rm -rf "$seeds/trace"
      "$(swift build --show-bin-path)/tracery" record -d "$seeds/trace" -A 'report@arg1/s,arg2' -R 'fib@retval' \
        -- "$seeds/demo" 5 >/dev/null
      # Each thread's real events cut into sealed 256-byte chunks (the harness's chunk size; see
      # FuzzHarness.eventFile for the first byte), and as format 2 without seals.
      python3 - "$corpus" "$seeds/trace"/*.events <<'PY'
import struct, sys, os
corpus, files = sys.argv[1], sys.argv[2:]
M = (1 << 64) - 1
def seal(body):
    a = b = 0
    for (w,) in struct.iter_unpack("<Q", body):
        a = (a + w) & M
        b = (b + a) & M
    return struct.pack("<QQ", (0x5EA1 << 48) | len(body), a ^ (((b << 32) | (b >> 32)) & M))
for path in files:
    data = open(path, "rb").read()
    (word0,) = struct.unpack_from("<Q", data, 4096)
    raw, at, events = data[4112:4112 + (word0 & 0xFFFFFFFFFFFF)], 0, []
    while at + 8 <= len(raw):
        (w,) = struct.unpack_from("<Q", raw, at)
        size = {1: 16, 2: 8, 3: 8 + (w & 0xFFFFFFFF)}.get(w >> 62, 8)
        events.append(raw[at:at + size])
        at += size
    chunks, chunk = [], b""
    for event in events:
        if len(chunk) + len(event) > 240:
            chunks.append(chunk)
            chunk = b""
        chunk += event
    chunks.append(chunk)
    sealed = b"".join(seal(c) + c + bytes(240 - len(c)) for c in chunks[:-1]) + seal(chunks[-1]) + chunks[-1]
    name = os.path.basename(path)
    open(os.path.join(corpus, name + "-v3"), "wb").write(b"\x00" + sealed[:4096])
    open(os.path.join(corpus, name + "-v2"), "wb").write(b"\x40" + raw[:2048])
    end = min(len(sealed), 4096)
    open(os.path.join(corpus, name + "-end"), "wb").write(b"\x80" + struct.pack("<H", end) + sealed[:4096])
PY
      ;;
    texts)
      swift build --product tracery >/dev/null
      clang -O2 -fpatchable-function-entry=5 "$seeds/seed.c" -o "$seeds/seed"
      rm -rf "$seeds/texts"
      "$(swift build --show-bin-path)/tracery" record -d "$seeds/texts" -- "$seeds/seed" >/dev/null || true
      { printf '\x00'; cat "$seeds/texts"/process-*.info; } > "$corpus/process"
      { printf '\x01'; cat "$seeds/texts"/symbols/*.sym; } > "$corpus/symbols"
      printf '\x02open@arg1/s,arg2/x,fparg1/f32' > "$corpus/spec"
      printf '\x03^ns::Stack.*push$\n_ZN2ns5StackIiE4pushERKi' > "$corpus/regex"
      printf '\x04ns::*::push\n_ZN2ns5StackIiE4pushERKi' > "$corpus/glob"
      printf '\x05Plan::ComputeCriticalPath()::TopoSort::Visit(Edge*)' > "$corpus/demangle"
      printf '\x06a%%20b%%zz%%' > "$corpus/escape"
      ;;
  esac
fi

echo "== fuzzing $target: $runs runs"
# Inputs that once crashed seed every run too (libFuzzer adds new inputs to the first directory only).
regressions=()
[ -d "Fuzz/Regressions/$target" ] && regressions=("Fuzz/Regressions/$target")
# The fuzzer's own status fails the run (a crash, a leak, a timeout). (Under pipefail, reading
# PIPESTATUS after `|| true` read true's: a crash the events fuzzer found passed CI.)
status=0
"$binary" "$corpus" "${regressions[@]}" -runs="$runs" -seed=1 -max_len=65536 -timeout=10 -rss_limit_mb=1024 \
  -artifact_prefix="$work/crash-$target-" -print_final_stats=1 "$@" 2>&1 |
  { grep -E "^(stat::|Done|INFO: (Loaded|seed)|==[0-9]+==ERROR|SUMMARY|artifact_prefix)|Test unit written|DEDUP|Slowest" || true; } ||
  status=$?
if [ "$status" -ne 0 ]; then
  echo "fuzzing $target failed (status $status): the input is in $work/crash-$target-*" >&2
  exit 1
fi
