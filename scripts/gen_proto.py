"""Regenerate tvix_mountd/proto/ from proto/, or (--check) prove it is current.

The .proto files keep tvix's import paths (tvix/castore/protos/...), so the
generated modules live under tvix_mountd/proto/tvix/...; their absolute
imports are rewritten to point into this package.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "tvix_mountd" / "proto"
PACKAGE = "tvix_mountd.proto"
# Hand-written files in OUT_DIR that generation must leave alone.
KEEP = {"__init__.py"}
BIN_DIR = Path(sys.executable).parent

IMPORT_RE = re.compile(r"^(from|import) (tvix\.(castore|store|mountd)\.)", re.MULTILINE)


def generate(into: Path) -> None:
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        # mypy-protobuf's plugins live beside this interpreter, maybe not on PATH.
        f"--plugin=protoc-gen-mypy={BIN_DIR / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN_DIR / 'protoc-gen-mypy_grpc'}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--mypy_out=quiet:{into}",
        f"--mypy_grpc_out=quiet:{into}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in into.rglob("*.py*"):
        text = IMPORT_RE.sub(rf"\1 {PACKAGE}.\2", path.read_text())
        path.write_text(text)
    for directory in [into, *[d for d in into.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()


def generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if (p.is_file() and "__pycache__" not in p.parts and p.relative_to(root).name not in KEEP)
        or (p.is_file() and p.parent != root and p.name == "__init__.py")
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            want, have = generated_files(fresh), generated_files(OUT_DIR)
            stale = sorted(str(p) for p in want ^ have)
            stale += sorted(
                str(p)
                for p in want & have
                if not filecmp.cmp(fresh / p, OUT_DIR / p, shallow=False)
            )
            if stale:
                print("generated protobuf code is stale; run `make proto`:", file=sys.stderr)
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print("generated protobuf code is current")
            return 0
        for p in generated_files(OUT_DIR):
            (OUT_DIR / p).unlink()
        for p in generated_files(fresh):
            (OUT_DIR / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(fresh / p, OUT_DIR / p)
        print(f"regenerated {OUT_DIR.relative_to(ROOT)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
