#!/usr/bin/env bash
# The test suites that do not patch code (the ELF reader, the trace format and readers, the
# instruction writer) under AddressSanitizer, in a build of their own (.build-asan):
#
#   scripts/sanitize.sh [swift test options...]
#
# The suites that patch code or run the agent stay out: an instrumented agent cannot be loaded
# into uninstrumented programs. Leaks reported inside the toolchain's own libraries (XCTest's
# suite objects, Foundation.Process's weak reference) are suppressed (scripts/lsan.supp); a leak
# anywhere else fails the run. .ci/run runs this script.
set -euo pipefail
cd "$(dirname "$0")/.."
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp:print_suppressions=0"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"
swift test --sanitize=address --scratch-path .build-asan \
  --filter 'TraceryELFTests|TraceryRecordTests|TraceryX86Tests' "$@"
