#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages, the virtualenv, the
# package itself. `make demo`, `make test` and `make bench` all start here.
#
#   scripts/setup.sh            runtime packages (FUSE) + venv
#   scripts/setup.sh --test     also what the test suite needs (nix-store)
#   scripts/setup.sh --bench    also the benchmark peers (bindfs, squashfuse)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

packages=(fuse3 libfuse3-dev pkg-config gcc attr)
for arg in "$@"; do
    case "$arg" in
        --test) packages+=(nix-bin) ;;
        --bench) packages+=(nix-bin bindfs squashfuse squashfs-tools) ;;
        *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "setup: installing Debian packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    else
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: run this first:  sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

# Rebuild the venv only when pyproject.toml changed since the last install.
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "setup: creating virtualenv in $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    echo "setup: installing tvix-mountd and its dependencies (pyfuse3 builds from source)" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]' >&2
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
