#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages, the virtualenv, the
# package itself. `make demo`, `make test` and `make bench` all start here.
#
#   scripts/setup.sh            runtime packages (FUSE) + venv
#   scripts/setup.sh --test     also what the test suite needs (nix-store)
#   scripts/setup.sh --bench    also the benchmark peers (bindfs, squashfuse)
set -euo pipefail

# On failure, name the command that failed and its line (set -e alone exits
# silently), and remove the pyfuse3 build directory whatever happened.
# errtrace: the ERR trap also fires inside functions.
set -o errtrace
failed_step=""
work=""
trap 'failed_step="line $LINENO: $BASH_COMMAND"' ERR
on_exit() {
    local status=$?
    if ((status)) && [[ -n $failed_step ]]; then
        echo "setup: failed (exit $status) at $failed_step" >&2
    fi
    if [[ -n $work ]]; then
        rm -rf "$work"
    fi
}
trap on_exit EXIT

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

packages=(fuse3 libfuse3-dev pkg-config gcc attr patch)
for arg in "$@"; do
    case "$arg" in
        --test) packages+=(nix-bin) ;;
        --bench) packages+=(nix-bin bindfs squashfuse squashfs-tools time) ;;
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

# pyfuse3 with the patch set in third_party/pyfuse3/ (NN-name.patch, applied
# in order; third_party/pyfuse3/README.md says what each is for). Built from
# the release's sdist, checked against its hash, as pip would build it anyway
# (pyfuse3 ships no wheels). Its version names the patches: 3.5.0+name.name...
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCHES=(third_party/pyfuse3/[0-9][0-9]-*.patch)

install_patched_pyfuse3() {
    local sdist
    work=$(mktemp -d)  # global: on_exit removes it
    sdist="$work/pyfuse3-$PYFUSE3_VERSION.tar.gz"
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "pyfuse3==$PYFUSE3_VERSION" -d "$work" >&2
    if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --quiet >&2; then
        echo "setup: pyfuse3-$PYFUSE3_VERSION.tar.gz does not match its pinned sha256" >&2
        exit 1
    fi
    tar -xzf "$sdist" -C "$work"
    local patch label=""
    for patch in "${PYFUSE3_PATCHES[@]}"; do
        patch -d "$work/pyfuse3-$PYFUSE3_VERSION" -p1 --quiet --forward <"$patch" >&2
        patch=$(basename "$patch" .patch)
        label+="${label:+.}${patch#[0-9][0-9]-}"
    done
    sed -i "s/^Version: $PYFUSE3_VERSION\$/Version: $PYFUSE3_VERSION+${label//-/.}/" \
        "$work/pyfuse3-$PYFUSE3_VERSION/PKG-INFO"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
        "$work/pyfuse3-$PYFUSE3_VERSION" >&2
    rm -rf "$work"
    work=""
}

# Rebuild the venv only when pyproject.toml or the patches changed since the
# last install.
stamp="$VENV/.installed-$(cat pyproject.toml "${PYFUSE3_PATCHES[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "setup: creating virtualenv in $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
    echo "setup: building pyfuse3 $PYFUSE3_VERSION with ${PYFUSE3_PATCHES[*]}" >&2
    install_patched_pyfuse3
    echo "setup: installing tvix-mountd and its dependencies" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]' >&2
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
