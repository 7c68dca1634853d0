#!/usr/bin/env bash
# Run a sweep's cells one at a time in a chosen order (most informative first), so that a session that can
# afford only a few cells runs the ones that matter:
#   scripts/sweep_queue.sh conf/sweeps/converged-fmnist-ir100.yaml conf/sweeps/converged-fmnist-ir100.queue
# The queue file holds one "SETTING SEED" per line ('#' starts a comment). fedlt-sweep skips a finished cell
# and continues an interrupted one from its checkpoint, so the queue can be stopped and started at will.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 SWEEP_FILE QUEUE_FILE" >&2; exit 2; }
spec=$1; queue=$2
cells() { grep -v '^\s*\(#\|$\)' "$queue" || true; }
# check every line now, not hours later: the format here, the values by fedlt-sweep (one dry run for all)
bad=$(cells | awk 'NF != 2' | head -1)
[ -z "$bad" ] || { echo "$queue: expected 'SETTING SEED', got '$bad'" >&2; exit 2; }
[ -n "$(cells)" ] || { echo "$queue: no cells" >&2; exit 2; }
join() { cells | awk -v f="$1" '{print $f}' | sort -u | paste -sd, -; }
plan=$(.venv/bin/fedlt-sweep "$spec" --only "setting=$(join 1)" --only "seed=$(join 2)" --dry-run)
# the cells that plan finds finished are passed over here: a fedlt-sweep call would only skip them, after
# rewriting the sweep's tables and plots (seconds each, minutes over a long queue)
finished() { grep -qF " ${1}__seed-${2}: finished, skip" <<<"$plan"; }
cells | while read -r setting seed; do
  ! finished "$setting" "$seed" || continue
  echo "[queue] $(date -Is) $setting seed $seed"
  .venv/bin/fedlt-sweep "$spec" --only "setting=$setting" --only "seed=$seed" || echo "[queue] $setting seed $seed failed ($?)"
done
