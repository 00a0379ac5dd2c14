#!/usr/bin/env bash
# Build every fuzz target, then run each under libFuzzer for FUZZ_SECONDS
# (default 8) with the memory and time budgets; exit non-zero if any target
# crashes, exceeds a budget or times out. A long campaign is the same command
# with a bigger FUZZ_SECONDS (e.g. FUZZ_SECONDS=3600).
#
# Environment (all optional):
#   FUZZ_SECONDS    seconds per target (default 8)
#   FUZZ_TARGETS    space-separated subset (default: every target)
#   FUZZ_TOOLCHAIN  rustup toolchain for cargo-fuzz (default: nightly when
#                   installed, else stable with RUSTC_BOOTSTRAP=1, which
#                   builds and runs the ASan targets on Rust 1.95 too)
#   FUZZ_SANITIZER  address (default) or none; -malloc_limit_mb needs the
#                   sanitizer's malloc hooks, so "none" checks RSS only
#   FUZZ_RSS_MB     -rss_limit_mb for the whole process, which also holds
#                   libFuzzer's in-memory corpus and ASan's quarantine
#                   (default 1024)
#   FUZZ_MALLOC_MB  -malloc_limit_mb: largest single allocation (default 64)
#   QBLOCK_FUZZ_HEAP_MB  heap one input may add (default 64; src/lib.rs)
#   FUZZ_MAX_LEN    -max_len in bytes (default 1 MiB as seed.py's seeds;
#                   8 MiB for vhdx, whose regions sit at MiB offsets)
#   FUZZ_JOBS       cargo build jobs (default 2)
#   CARGO_TARGET_DIR  build directory (default rust/fuzz/target)
set -euo pipefail
cd "$(dirname "$0")"

secs=${FUZZ_SECONDS:-8}
if [ -z "${FUZZ_TOOLCHAIN:-}" ]; then
    if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        FUZZ_TOOLCHAIN=nightly
    else
        FUZZ_TOOLCHAIN=stable
    fi
fi
toolchain=$FUZZ_TOOLCHAIN
# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module):
# a stable compiler accepts them with RUSTC_BOOTSTRAP=1.
[ "$toolchain" = nightly ] || export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}
rss=${FUZZ_RSS_MB:-1024}
malloc=${FUZZ_MALLOC_MB:-64}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export CARGO_BUILD_JOBS=${FUZZ_JOBS:-2}

command -v cargo-fuzz >/dev/null || { echo "smoke: cargo-fuzz missing (cargo install cargo-fuzz)" >&2; exit 2; }
fuzz=(cargo "+$toolchain" fuzz)
targets=${FUZZ_TARGETS:-$("${fuzz[@]}" list --fuzz-dir .)}

[ -d corpus ] || python3 seed.py

t0=$(date +%s)
"${fuzz[@]}" build --fuzz-dir . -s "$sanitizer"
echo "smoke: build took $(( $(date +%s) - t0 )) s"

failed=()
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last-run.log"
    case $t in vhdx) max_len=${FUZZ_MAX_LEN:-8388608} ;; *) max_len=${FUZZ_MAX_LEN:-1048576} ;; esac
    echo "smoke: $t for ${secs}s"
    if "${fuzz[@]}" run --fuzz-dir . -s "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=1 -rss_limit_mb="$rss" \
        -malloc_limit_mb="$malloc" -max_len="$max_len" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
        execs=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        echo "smoke: $t ok, ${runs:-?} executions, ${execs:-?} execs/s"
    else
        echo "smoke: $t FAILED (see $log):"
        grep -E "^==[0-9]+==|panicked|ERROR|Test unit written" "$log" | head -8 || true
        failed+=("$t")
    fi
done
echo "smoke: total $(( $(date +%s) - t0 )) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "smoke: failures in: ${failed[*]}" >&2
    exit 1
fi
