#!/bin/sh
# test_bench_smoke - bench/run --quick still works: relayd accepts load from bench/loadgen
# (STARTTLS + AUTH PLAIN) with no errors, so the benchmark harness cannot rot unnoticed.
# TAP output; run by `make check` (top_builddir/top_srcdir exported) or by hand.
top_srcdir=${top_srcdir:-$(cd "$(dirname "$0")/../.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
echo "1..9"
out=$(mktemp "${TMPDIR:-/tmp}/bench-smoke.XXXXXX") || { echo "Bail out! mktemp failed"; exit 1; }
trap 'rm -f "$out"' EXIT

if [ -x "$top_builddir/bench/loadgen" ] && [ -x "$top_builddir/bench/sink" ] && [ -x "$top_builddir/relayd/relayd" ]; then
	build=--no-build  # make check built everything; do not run make inside make
else
	build=
fi
timeout 300 "$top_srcdir/bench/run" --quick $build > "$out" 2>&1
rc=$?
if [ "$rc" = 0 ]; then echo "ok 1 - bench/run --quick exits 0"; else echo "not ok 1 - bench/run --quick exits 0 (status $rc)"; fi

results=$(grep '^RESULT server=relayd' "$out")
n=$(printf '%s\n' "$results" | grep -c 'rate=')
if [ "$n" -ge 1 ]; then echo "ok 2 - RESULT lines printed ($n)"; else echo "not ok 2 - RESULT lines printed"; fi

bad_rate=$(printf '%s\n' "$results" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^rate=/) { split($i, a, "="); if (a[2] + 0 <= 0) print } }')
if [ "$n" -ge 1 ] && [ -z "$bad_rate" ]; then echo "ok 3 - every run has rate > 0"; else echo "not ok 3 - every run has rate > 0"; fi

bad_err=$(printf '%s\n' "$results" | grep -Ev ' errors=0( |$)')
if [ "$n" -ge 1 ] && [ -z "$bad_err" ]; then echo "ok 4 - every run has errors=0"; else echo "not ok 4 - every run has errors=0"; fi

if grep -q '^idle: \([1-9][0-9]*\) of \1 TLS sessions open' "$out"; then
	echo "ok 5 - idle sessions established"
else
	echo "not ok 5 - idle sessions established"
fi
# check N NAME STATUS [DETAIL]: ok or not ok N (a failure has the output dumped below)
dump=
check() {
	if [ "$3" = 0 ]; then
		echo "ok $1 - $2"
	else
		echo "not ok $1 - $2${4:+ ($4)}"
		dump=1
	fi
}
half=$(grep '^RESULT server=relayd mode=half-of-peak' "$out")
printf '%s\n' "$half" | grep -Eq 'offered=[1-9][0-9]* msgs=[1-9][0-9]* .*dot_p99=[0-9.]*[1-9][0-9.]* errors=0 runs=1 '
check 6 "half-of-peak open-loop run: messages sent, final-dot latency measured, no errors" $?
printf '%s\n' "$half" | grep -Eq ' srv_p50=[0-9.]*[1-9][0-9.]* srv_p99=[0-9.]*[1-9][0-9.]* '
check 7 "half-of-peak run: relayd's own accept-to-250 histogram read from its metrics listener" $?
grep -Eq '^RESULT server=relayd clients=[0-9]+ mode=resume msgs=[1-9][0-9]* .* errors=0 resumed=[1-9]' "$out"
check 8 "the resumption row: sessions resumed with the tickets relayd issued" $?
sink=$(grep '^sink (relayd): received' "$out")
printf '%s\n' "$sink" | grep -Eq '^sink \(relayd\): received ([1-9][0-9]*) of \1 messages answered 250 \(0 files still'
check 9 "every message answered 250 reached the sink, none left in the queue" $? "$sink"
if [ "$rc" != 0 ] || [ "$n" -lt 1 ] || [ -n "$dump$bad_rate$bad_err" ]; then
	sed 's/^/# /' "$out"
fi
