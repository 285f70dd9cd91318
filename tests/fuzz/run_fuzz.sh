#!/usr/bin/env bash
# Run the atheris harness for SECONDS in total, restarting after a finding (kept as crash-*),
# with a persistent corpus.  Usage: tests/fuzz/run_fuzz.sh [SECONDS] [WORKDIR]
set -u
total=${1:-1800}
work=${2:-/tmp/fastattn-fuzz}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work/corpus" "$work/crashes"
touch "$work/log"
first=$(( $(wc -l < "$work/log") + 1 ))      # this run's part of the log
start=$(date +%s)
while :; do
    left=$(( total - ($(date +%s) - start) ))
    [ "$left" -le 5 ] && break
    (cd "$work/crashes" && python "$here/fuzz_attention.py" "$work/corpus" \
        -max_total_time="$left" -print_final_stats=1 -rss_limit_mb=4096 -timeout=60) \
        >>"$work/log" 2>&1
    echo "fuzzer exited with $? at $(date)" >>"$work/log"
done
# libFuzzer ends each session with "Done N runs in S second(s)" (Python's atexit never runs)
tail -n +"$first" "$work/log" |
    awk '/^Done [0-9]+ runs in/ {n += $2; t += $5} END {printf "fuzz: %d runs in %d s\n", n, t}'
