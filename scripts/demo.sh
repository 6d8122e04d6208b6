#!/usr/bin/env bash
# The demo on the embedded store: import a sample tree, start the supervisor
# with two mounts of it (configs/demo.toml), look inside, ask for status and
# health. Runs until Ctrl-C (then stops and unmounts); DEMO_ONESHOT=1 stops
# right away.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/demo.toml
DEMO_DIR=/tmp/tvix-mountd-demo
LISTED=$DEMO_DIR/mnt/listed
STORE=$DEMO_DIR/mnt/store
HEALTH=http://127.0.0.1:9137
BIN=${VENV:-.venv}/bin/tvix-mountd

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# A sample tree with every kind of entry.
sample=$DEMO_DIR/sample/hello-tvix
rm -rf "$DEMO_DIR/sample"
mkdir -p "$sample/bin" "$sample/share/doc" "$sample/empty"
echo "Hello from a tvix store, served over FUSE." > "$sample/share/doc/README"
printf '#!/bin/sh\necho "hello, tvix"\n' > "$sample/bin/hello"
chmod +x "$sample/bin/hello"
ln -sf bin/hello "$sample/hello"
: > "$sample/share/doc/empty-file"
head -c 1048576 /dev/zero | tr '\0' 'x' > "$sample/share/big.txt"

say "Importing $sample into the embedded store"
store_path=$("$BIN" import --config "$CONFIG" --store local "$sample")
echo "store path: $store_path  (nix-store --add would print the same)"
base=$(basename "$store_path")

say "Starting the supervisor: $BIN start --config $CONFIG"
"$BIN" start --config "$CONFIG" &
supervisor=$!
cleanup() {
    if kill -0 "$supervisor" 2>/dev/null; then
        say "Stopping: $BIN stop"
        # It may be stopping already (a Ctrl-C reaches it too).
        "$BIN" stop --config "$CONFIG" 2>/dev/null || kill -TERM "$supervisor" 2>/dev/null || true
        wait "$supervisor" || true
    fi
}
trap cleanup EXIT
for _ in $(seq 200); do
    curl -sf "$HEALTH/readyz" >/dev/null 2>&1 && break
    kill -0 "$supervisor" 2>/dev/null || { echo "the supervisor exited" >&2; exit 1; }
    sleep 0.1
done

say "Status"
run "$BIN" status --config "$CONFIG"
say "The mount that lists its root"
run ls -l "$LISTED"
run ls -lR "$LISTED/$base"
say "The mount that does not (as tvix-store mounts by default)"
run ls "$STORE" 2>&1 || true
run cat "$STORE/$base/share/doc/README"
run "$STORE/$base/hello"
run getfattr -d "$STORE/$base"
run touch "$STORE/$base/new" 2>&1 || true
say "The mount outlives its worker: a file held open across a SIGKILL and a restart"
exec 3< "$STORE/$base/share/doc/README"
mount_id() { awk -v p="$STORE" '$5 == p { print $1 }' /proc/self/mountinfo; }
worker() { "$BIN" status --json --config "$CONFIG" | python3 -c \
    'import json, sys; print(next(m["pid"] for m in json.load(sys.stdin)["mounts"] if m["name"] == "store"))'; }
echo "mount ID $(mount_id), worker $(worker)"
run kill -KILL "$(worker)"
run cat "$STORE/$base/share/doc/README"   # waits for the replacement, then reads
run "$BIN" restart --config "$CONFIG" store
run cat /proc/self/fd/3                    # the descriptor opened before both
exec 3<&-
echo "mount ID $(mount_id), worker $(worker)"
say "Health"
run curl -s "$HEALTH/healthz"
run curl -s "$HEALTH/readyz"
run curl -s "$HEALTH/status"
echo
run sh -c "curl -s $HEALTH/metrics | grep -E '^tvix_mountd_(mount_up|restarts_total|handovers_total|rootcache_hits_total)'"

if [[ -n "${DEMO_ONESHOT:-}" ]]; then
    exit 0
fi
say "Serving at $LISTED and $STORE. Press Ctrl-C to stop and unmount."
wait "$supervisor"
