#!/usr/bin/env bash
# Fails when a test run left something behind: an entry in the test
# directory DIR (UNIONFS_TEST_DIR of the run), a mount under DIR or /tmp, or
# a /tmp/unionfs-* directory newer than MARKER (a file made before the run).
# Usage: tests/check-leftovers.sh DIR MARKER
set -euo pipefail
dir=$1 marker=$2
bad=0
left=$(find "$dir" -mindepth 1 -maxdepth 1 2>/dev/null || true)
if [ -n "$left" ]; then
    echo "check-leftovers: left in $dir:" $left >&2
    bad=1
fi
mounts=$(awk -v d="$dir" '$5 ~ "^"d"/" || $5 ~ "^/tmp/unionfs-" {print $5}' /proc/self/mountinfo)
if [ -n "$mounts" ]; then
    echo "check-leftovers: mounts left:" $mounts >&2
    bad=1
fi
stray=$(find /tmp -mindepth 1 -maxdepth 1 -name 'unionfs-*' -newer "$marker" 2>/dev/null || true)
if [ -n "$stray" ]; then
    echo "check-leftovers: left in /tmp:" $stray >&2
    bad=1
fi
exit $bad
