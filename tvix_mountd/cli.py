"""`tvix-mountd ...`: the command line.

A user's mistake (bad config, bad address, missing path) ends with one clear
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Commands import what they use, so that `mount` (a long-running daemon)
# carries no config or supervisor machinery in its memory, and `status` and
# the other control commands start quickly (no trio, no store).
if TYPE_CHECKING:
    from tvix_mountd.castore.store import Store
    from tvix_mountd.progress import ProgressLine

log = logging.getLogger("tvix_mountd")

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """Ends the command with this message and exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# -- import ---------------------------------------------------------------


async def _import(store: Store, paths: list[Path], line: ProgressLine | None) -> None:
    import trio

    from tvix_mountd.castore.errors import first_error

    try:
        async with trio.open_nursery() as nursery:
            if line is not None:
                nursery.start_soon(line.run)
            for path in paths:
                await _import_one(store, path, line)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        if line is not None:
            line.finish()
        await store.aclose()


async def _import_one(store: Store, path: Path, line: ProgressLine | None) -> None:
    from tvix_mountd.castore.errors import StoreError
    from tvix_mountd.castore.importer import ImportProgress, import_path

    progress = ImportProgress()
    if line is not None:
        line.start(path, progress)
    started = time.monotonic()
    try:
        info = await import_path(store, path, progress=progress)
    except OSError as e:
        # The file that failed, which may be deep inside the tree.
        where = os.fsdecode(e.filename) if e.filename is not None else str(path)
        raise CliError(f"{where}: {e.strerror or e}") from None
    except StoreError as e:
        raise CliError(f"{path}: {e}") from None
    finally:
        if line is not None:
            line.finish()
    # stdout carries exactly one store path per argument; the rest is for humans.
    print(info.store_path.absolute, flush=True)
    log.info(
        "imported %s: %s, %s bytes in %.1f s; root %s, NAR %d bytes, sha256 %s",
        path,
        _count(progress.files, "file"),
        f"{progress.bytes_read:,}",
        time.monotonic() - started,
        _describe_node(info.node),
        info.nar_size,
        info.nar_sha256.hex(),
    )


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _describe_node(node: object) -> str:
    digest = getattr(node, "digest", None)
    kind = type(node).__name__.removesuffix("Node").lower()
    return f"{kind} {digest}" if digest is not None else kind


def cmd_import(args: argparse.Namespace) -> int:
    import trio

    from tvix_mountd.config import ConfigError, load_store_config

    try:
        store_config = load_store_config(args.config, args.store)
    except ConfigError as e:
        raise CliError("\n".join(f"{e.source}: {p}" for p in e.problems), EXIT_USAGE) from None
    store = _open_store(
        store_config.blob_service_addr,
        store_config.directory_service_addr,
        store_config.path_info_service_addr,
        store_config.backend_timeout,
    )
    paths = [Path(p) for p in args.paths]
    if not sys.stderr.isatty():
        trio.run(_import, store, paths, None)
        return 0
    from tqdm.contrib.logging import logging_redirect_tqdm

    from tvix_mountd.progress import ProgressLine

    # Log lines while the progress line is up are printed above it.
    with logging_redirect_tqdm():
        trio.run(_import, store, paths, ProgressLine(sys.stderr))
    return 0


def _open_store(
    blob: str, directory: str, path_info: str, timeout: float, *, prefetch_references: int = 0
) -> Store:
    from tvix_mountd.castore.errors import AddressError
    from tvix_mountd.castore.store import Store

    try:
        return Store.from_addrs(
            blob, directory, path_info, timeout=timeout, prefetch_references=prefetch_references
        )
    except AddressError as e:
        raise CliError(str(e), EXIT_USAGE) from None


# -- check-config ---------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from tvix_mountd.config import ConfigError, load_config

    try:
        config = load_config(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{e.source}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{args.file}: valid ({len(config.stores)} stores, {len(config.mounts)} mounts)",
    )
    return 0


# -- mount ----------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    import trio

    from tvix_mountd.castore.addr import prefetch_problem
    from tvix_mountd.procutil import raise_open_file_limit
    from tvix_mountd.workers.filesystem import StoreFilesystem
    from tvix_mountd.workers.mount import MountError, MountOptions, serve_until_signalled
    from tvix_mountd.workers.rootnodes import PathInfoRootNodes

    problem = prefetch_problem(
        args.path_info_service_addr, args.prefetch_references, "--prefetch-references"
    )
    if problem:
        raise CliError(problem, EXIT_USAGE)
    store = _open_store(
        args.blob_service_addr,
        args.directory_service_addr,
        args.path_info_service_addr,
        args.backend_timeout,
        prefetch_references=args.prefetch_references,
    )
    fs = StoreFilesystem(
        store.blobs,
        store.directories,
        PathInfoRootNodes(store.path_infos),
        list_root=args.list_root,
        show_xattr=args.show_xattr,
        plain_listings=args.plain_listings,
        read_ahead=args.read_ahead,
        backend_timeout=args.backend_timeout,
        store_pages=True,
    )
    options = MountOptions(fsname=args.fsname, allow_other=args.allow_other)
    raise_open_file_limit()

    async def run() -> None:
        try:
            await serve_until_signalled(fs, str(args.mountpoint), options, background=store.run)
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    try:
        trio.run(run)
    except MountError as e:
        raise CliError(str(e)) from None
    return 0


# -- start / status / stop / reload ----------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    from tvix_mountd.config import ConfigError, default_config, load_config
    from tvix_mountd.logs import setup_logging
    from tvix_mountd.supervisor.service import Supervisor, SupervisorError

    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as e:
        raise CliError("\n".join(f"{e.source}: {p}" for p in e.problems), EXIT_USAGE) from None
    # One log stream for every process: set up before anything is forked.
    setup_logging(args.log_level or config.supervisor.log_level, config.supervisor.log_format)
    supervisor = Supervisor(config, args.config)
    try:
        return supervisor.start()
    except SupervisorError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise CliError(f"cannot start: {e}") from None


def _state_dir(args: argparse.Namespace) -> Path:
    from tvix_mountd.config import DEFAULT_STATE_DIR, ConfigError, load_state_dir

    if args.state_dir:
        return Path(args.state_dir)
    if args.config:
        try:
            return Path(load_state_dir(args.config))
        except ConfigError as e:
            raise CliError("\n".join(f"{e.source}: {p}" for p in e.problems), EXIT_USAGE) from None
    return Path(DEFAULT_STATE_DIR)


def _control(args: argparse.Namespace) -> Any:
    from tvix_mountd.supervisor.control_client import ControlClient, ControlError

    state_dir = _state_dir(args)
    try:
        return ControlClient(state_dir)
    except ControlError as e:
        raise CliError(str(e)) from None


def cmd_status(args: argparse.Namespace) -> int:
    from tvix_mountd.supervisor.control_client import ControlError, format_status

    try:
        document = _control(args).status()
    except ControlError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_status(document))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from tvix_mountd.supervisor.control_client import ControlError

    try:
        _control(args).stop(wait=not args.no_wait)
    except ControlError as e:
        raise CliError(str(e)) from None
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from tvix_mountd.supervisor.control_client import ControlError

    try:
        problems, changes = _control(args).reload()
    except ControlError as e:
        raise CliError(str(e)) from None
    for change in changes:
        print(change)
    if problems:
        for problem in problems:
            print(f"reload refused: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not changes:
        print("no changes")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    from tvix_mountd.supervisor.control_client import ControlError

    try:
        done, problems = _control(args).restart(args.mounts)
    except ControlError as e:
        raise CliError(str(e)) from None
    for line in done:
        print(line)
    for problem in problems:
        print(f"not restarted: {problem}", file=sys.stderr)
    return EXIT_FAILURE if problems else 0


# -- parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvix-mountd", description="Serve read-only views of a tvix store over FUSE."
    )
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "start",
        help="run the supervisor and every mount of a config, in the foreground",
        description="Runs until SIGTERM or SIGINT (or `tvix-mountd stop`), then unmounts"
        " everything and exits 0. SIGHUP reloads the config. Without --config: one"
        " embedded store under /var/lib/tvix-mountd, mounted at"
        " /var/lib/tvix-mountd/mnt/store.",
    )
    p.add_argument("--config", type=Path, help="config file (TOML)")
    p.set_defaults(func=cmd_start)

    for name, help_text, func in [
        ("status", "show the mounts of a running supervisor", cmd_status),
        ("stop", "unmount everything and stop a running supervisor", cmd_stop),
        ("reload", "re-read the config of a running supervisor", cmd_reload),
        (
            "restart",
            "hand mounts to fresh workers running the code installed now, without unmounting",
            cmd_restart,
        ),
    ]:
        p = sub.add_parser(name, help=help_text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", type=Path, help="the config it runs (for its state_dir)")
        where.add_argument("--state-dir", help="its state_dir (default /run/tvix-mountd)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="the status document as JSON")
        if name == "stop":
            p.add_argument("--no-wait", action="store_true", help="do not wait for it to exit")
        if name == "restart":
            p.add_argument("mounts", nargs="*", metavar="MOUNT", help="default: every mount")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "import",
        help="put local trees into a store; print their store paths",
        description="Import each PATH as `nix-store --add PATH` would, printing one"
        " /nix/store path per PATH on stdout.",
    )
    p.add_argument("--config", required=True, type=Path, help="config file (TOML)")
    p.add_argument("--store", required=True, help="the [stores.NAME] to import into")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "mount",
        help="mount one store view in the foreground (no supervisor)",
        description="Flags as `tvix-store mount` spells them; also read from the"
        " environment (BLOB_SERVICE_ADDR, ...). Ctrl-C or SIGTERM unmounts.",
    )
    default_addr = "grpc+http://[::1]:8000"  # tvix-store's default
    for flag in ("blob-service-addr", "directory-service-addr", "path-info-service-addr"):
        env = flag.upper().replace("-", "_")
        p.add_argument(f"--{flag}", default=os.environ.get(env, default_addr), metavar="ADDR")
    p.add_argument("-l", "--list-root", action="store_true", help="allow listing the root")
    # `--flag`, `--flag true` or `--flag false`, as tvix-store spells --show-xattr.
    for flag, default, help_text in (
        ("show-xattr", True, "expose digests as extended attributes"),
        ("plain-listings", False, "list without attributes where nobody stats the entries"),
        ("read-ahead", True, "read ahead what comes next when files are used in name order"),
    ):
        p.add_argument(
            f"--{flag}",
            type=_bool,
            nargs="?",
            const=True,
            default=default,
            metavar="true|false",
            help=f"{help_text} (default {str(default).lower()})",
        )
    p.add_argument(
        "--allow-other",
        action="store_true",
        default=_bool(os.environ.get("ALLOW_OTHER", "false")),
    )
    p.add_argument(
        "--threads", type=int, default=None, help="accepted for tvix-store parity; unused"
    )
    p.add_argument(
        "--backend-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="fail a backend call (EIO) that makes no progress for this long",
    )
    p.add_argument(
        "--prefetch-references",
        type=int,
        default=0,
        metavar="N",
        help="Nix binary cache: fetch the closure of fetched paths in the background,"
        " N paths at a time (default 0: only what is looked up)",
    )
    p.add_argument("--fsname", default="tvix-mountd", help=argparse.SUPPRESS)
    p.add_argument("mountpoint", type=Path, metavar="PATH")
    p.set_defaults(func=cmd_mount)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "start":  # start sets up the supervisor's own logging
        _setup_logging(args.log_level or "info")
    try:
        status: int = args.func(args)
    except CliError as e:
        print(f"tvix-mountd: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
