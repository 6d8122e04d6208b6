"""The start-up part: Debian's python3.11 and its standard library, and the program run from it.

    startup/bin/python3.11         a copy of /usr/bin/python3.11
    startup/lib/python3.11/        a copy of /usr/lib/python3.11 without its test/ package,
                                   with its __pycache__ directories

Python finds its standard library relative to its binary (the landmark
`lib/python3.11/os.py` next to `bin/`), so run from a mount it reads every
module, extension and pyc from the mount: `sys.prefix` is the part. Only the
shared libraries of the system (libc, libssl, libsqlite3...) come from
outside, as the dynamic loader finds them.

A store reports every time as 1 (DESIGN), so a pyc that records the source's
original mtime would be stale there and Python would compile the source
instead: a peer would pay for a compile the others do not. So the copy gets
the times a store shows: every source is set to mtime 1 and its pyc (the same
set Debian ships) is compiled again against that, by the copied interpreter,
with Debian's file names inside; then every time in the part is 1. Every peer
then reads valid pycs, as a start-up from /nix/store does.

The program imports IMPORTS (a realistic stdlib set: a CLI that parses
arguments, logs, speaks HTTP and email, keeps sqlite, runs asyncio and tests)
with `-I` (no user site, no PYTHON* variables) and `-B` (never writes a pyc:
the native tree must stay as built), then prints how many modules are loaded,
its `sys.prefix` and every loaded module file outside that prefix; the
harness checks that nothing came from outside and compares the count with
the reference start-up recorded when the part was built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

SOURCE_BINARY: Final = Path("/usr/bin/python3.11")
SOURCE_LIBRARY: Final = Path("/usr/lib/python3.11")
BINARY: Final = "bin/python3.11"  # relative to the part
LIBRARY: Final = "lib/python3.11"

IMPORTS: Final = (
    "argparse",
    "asyncio",
    "base64",
    "bz2",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "ctypes",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "email.parser",
    "enum",
    "fractions",
    "gettext",
    "gzip",
    "hashlib",
    "hmac",
    "html.parser",
    "http.client",
    "importlib.metadata",
    "inspect",
    "json",
    "logging.handlers",
    "lzma",
    "pathlib",
    "pickle",
    "platform",
    "random",
    "shutil",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
    "zoneinfo",
)

# Prints: the number of loaded modules, sys.prefix, then every module file
# outside sys.prefix (none when the whole start-up came from the part).
_REPORT: Final = """
import sys
prefix = sys.prefix + "/"
print(len(sys.modules), sys.prefix, sep="\\n")
for module in list(sys.modules.values()):
    file = getattr(module, "__file__", None)
    if file and not file.startswith(prefix):
        print(file)
"""

# Only when the part is built: a loaded source module without its pyc would be
# compiled on every start-up; print those too, so the build fails on them.
_NO_PYC: Final = "no pyc: "
_CHECK_BYTECODE: Final = f"""
import os
for module in list(sys.modules.values()):
    cached = getattr(module, "__cached__", None)
    if cached and not os.path.exists(cached):
        print({_NO_PYC!r} + cached)
"""

# Run by the copied interpreter (its pycs must carry its own magic number):
# argv[1] the copied library, argv[2] where Debian installed it.
_RECOMPILE: Final = """
import importlib.util, os, pathlib, py_compile, sys
library, origin = pathlib.Path(sys.argv[1]), sys.argv[2]
for pyc in sorted(library.rglob("__pycache__/*.pyc")):
    source = pathlib.Path(importlib.util.source_from_cache(str(pyc)))
    os.utime(source, (1, 1))
    py_compile.compile(
        str(source),
        cfile=str(pyc),
        dfile=os.path.join(origin, source.relative_to(library)),
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
    )
"""

# The same environment on every run; a VIRTUAL_ENV changes which site
# directories Debian's site.py probes.
ENV: Final = {"LC_ALL": "C", "PATH": "/usr/bin:/bin"}


def missing() -> str | None:
    """Why the part cannot be built on this machine, or None when it can."""
    for path in (SOURCE_BINARY, SOURCE_LIBRARY / "os.py"):
        if not path.exists():
            return f"{path} is missing (Debian's python3.11: apt-get install python3.11)"
    return None


def source_version() -> str:
    """The version of the interpreter the part copies (a change means new data)."""
    out = subprocess.run(
        [str(SOURCE_BINARY), "-I", "-S", "-c", "import sys; print(sys.version)"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    return out.stdout.strip()


def argv(part: Path, *, check_bytecode: bool = False) -> list[str]:
    """The start-up, run from the part at `part` (a plain tree or inside a mount)."""
    program = "import " + ", ".join(IMPORTS) + "\n" + _REPORT
    if check_bytecode:
        program += _CHECK_BYTECODE
    return [str(part / BINARY), "-I", "-B", "-c", program]


def loaded_modules(stdout: bytes, part: Path) -> int:
    """The module count a start-up printed; ValueError if any of it came from elsewhere."""
    lines = stdout.decode(errors="replace").splitlines()
    if len(lines) < 2 or not lines[0].isdigit():
        raise ValueError(f"printed {stdout[:200]!r}, not a module count and sys.prefix")
    prefix, outside = lines[1], lines[2:]
    if prefix != os.path.realpath(part):
        raise ValueError(f"sys.prefix is {prefix}, not the part {part}")
    if outside:
        raise ValueError(f"{len(outside)} files outside the part, e.g. {outside[0]}")
    return int(lines[0])


def _set_times_to_one(root: Path) -> None:
    """Every time in the tree to 1, as a store shows them; directories after their entries."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            os.utime(os.path.join(directory, name), (1, 1), follow_symlinks=False)
        os.utime(directory, (1, 1))


def build(part: Path) -> int:
    """Copy the interpreter and its library into `part`; the reference start-up's module count."""
    (part / BINARY).parent.mkdir(parents=True)
    shutil.copy2(SOURCE_BINARY, part / BINARY)
    library = part / LIBRARY
    # Symlinks are followed (Debian's sitecustomize.py points into /etc): the
    # part must hold everything the start-up reads.
    shutil.copytree(
        SOURCE_LIBRARY,
        library,
        ignore=lambda directory, _: ["test"] if Path(directory) == SOURCE_LIBRARY else [],
    )
    subprocess.run(
        [str(part / BINARY), "-I", "-B", "-c", _RECOMPILE, str(library), str(SOURCE_LIBRARY)],
        check=True,
        env=ENV,
    )
    _set_times_to_one(part)
    reference = subprocess.run(
        argv(part, check_bytecode=True), check=True, stdout=subprocess.PIPE, env=ENV
    ).stdout.splitlines(keepends=True)
    uncached = [line for line in reference if line.startswith(_NO_PYC.encode())]
    if uncached:
        raise RuntimeError(f"the start-up in {part} loads modules without a pyc: {uncached[:5]}")
    return loaded_modules(b"".join(reference), part)
