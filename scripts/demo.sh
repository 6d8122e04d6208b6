#!/usr/bin/env bash
# The demo on the embedded store: import a sample tree, mount it, look inside.
# Runs until Ctrl-C (then unmounts); DEMO_ONESHOT=1 unmounts right away.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/demo.toml
DEMO_DIR=/tmp/tvix-mountd-demo
MNT=$DEMO_DIR/mnt/listed
BIN=${VENV:-.venv}/bin/tvix-mountd
STORE_ADDRS=(
    --blob-service-addr "objectstore+file://$DEMO_DIR/data/blobs"
    --directory-service-addr "sqlite://$DEMO_DIR/data/directories.sqlite"
    --path-info-service-addr "sqlite://$DEMO_DIR/data/pathinfo.sqlite"
)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

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

say "Mounting the store at $MNT"
mkdir -p "$MNT"
if grep -qs " $MNT " /proc/mounts; then umount -l "$MNT" || true; fi
"$BIN" mount "${STORE_ADDRS[@]}" --list-root "$MNT" &
mount_pid=$!
cleanup() {
    if kill -0 "$mount_pid" 2>/dev/null; then
        kill -TERM "$mount_pid"
        wait "$mount_pid" || true
    fi
}
trap cleanup EXIT
for _ in $(seq 100); do
    grep -qs " $MNT fuse" /proc/mounts && break
    kill -0 "$mount_pid" 2>/dev/null || { echo "mount failed" >&2; exit 1; }
    sleep 0.1
done

base=$(basename "$store_path")
say "ls -l $MNT"
ls -l "$MNT"
say "ls -lR $MNT/$base"
ls -lR "$MNT/$base"
say "cat $MNT/$base/share/doc/README"
cat "$MNT/$base/share/doc/README"
say "$MNT/$base/hello   (a symlink to an executable, run through the mount)"
"$MNT/$base/hello"
say "getfattr -d $MNT/$base"
getfattr -d "$MNT/$base" 2>/dev/null
say "touch $MNT/$base/new   (read-only)"
touch "$MNT/$base/new" 2>&1 || true

if [[ -n "${DEMO_ONESHOT:-}" ]]; then
    exit 0
fi
say "Mounted at $MNT. Press Ctrl-C to unmount and exit."
wait "$mount_pid"
