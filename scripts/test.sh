#!/usr/bin/env bash
# Every test, on a fresh machine: sets up what the tests need beyond the toolchain, then runs
# `swift test` (arguments are passed on, e.g. --filter CorpusTests).
set -euo pipefail
cd "$(dirname "$0")/.."

# The corpus test (Tests/TraceryCLITests/CorpusTests.swift) builds real programs from Debian's
# source packages (apt-get source: a deb-src entry for the configured mirror, and dpkg-dev) and
# counts their calls with valgrind's callgrind.
update() { apt-get update -qq || echo "apt-get update failed: the corpus test needs Debian's mirror"; }
if ! grep -rqsE '^(deb-src |Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "adding deb-src entries for the configured mirrors"
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -e "$file" ] || continue
    sed 's/^Types: deb$/Types: deb-src/' "$file" > "${file%.sources}-tracery-src.sources"
  done
  if [ -s /etc/apt/sources.list ]; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/tracery-src.list
  fi
  update
fi
needed=()
command -v dpkg-source >/dev/null || needed+=(dpkg-dev)
command -v valgrind >/dev/null || needed+=(valgrind)
command -v python3 >/dev/null || needed+=(python3)
command -v make >/dev/null || needed+=(make)
if [ ${#needed[@]} -gt 0 ]; then
  echo "installing: ${needed[*]}"
  update
  apt-get install -y -qq "${needed[@]}" >/dev/null
fi

swift test "$@"
