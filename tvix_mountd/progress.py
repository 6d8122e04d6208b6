"""The live progress line of `tvix-mountd import` on a terminal.

One line on stderr, redrawn in place a few times a second: the path being
imported, files and bytes read so far, the rate, and the file being read:

    src: 12,345 files, 456MB, 123MB/s, lib/d0012/f001234.so

tqdm draws it: it smooths the rate, scales the units, fits the line to the
terminal's width (also after a resize) and clears it when done. The import
itself knows nothing about it: it updates an `ImportProgress`, which a task
here reads every REFRESH_SECONDS, so a fast import pays nothing per file
for the display. Only on a terminal: elsewhere the CLI prints no progress.
"""

from __future__ import annotations

import os
from typing import Final, Never, TextIO

import trio
from tqdm import tqdm

from tvix_mountd.castore.importer import ImportProgress

REFRESH_SECONDS: Final = 0.2


class ProgressLine:
    """The line for one import at a time: `start` one, `run` redraws it until
    cancelled, `finish` draws the final figures and clears the line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar: tqdm[Never] | None = None
        self._progress = ImportProgress()
        self._name = ""
        self._root = b""
        self._shown_bytes = 0

    def start(self, root: os.PathLike[str] | str, progress: ImportProgress) -> None:
        self.finish()
        self._progress = progress
        # The walker reports the paths it opens (root-relative is enough).
        self._name = os.fspath(root)
        self._root = os.fsencode(os.path.normpath(self._name)) + b"/"
        self._shown_bytes = 0
        self._bar = tqdm(
            file=self._stream,
            unit="B",
            unit_scale=True,
            dynamic_ncols=True,
            leave=False,
            # Redrawn by `run` only, at its pace.
            mininterval=0,
            miniters=0,
            # The whole line is ours; tqdm measures, fits and clears it.
            bar_format="{desc}",
        )
        self.refresh()

    def refresh(self) -> None:
        bar = self._bar
        if bar is None:
            return
        progress = self._progress
        done = progress.bytes_read
        # The rate as of the last refresh (tqdm's, smoothed over updates).
        rate = bar.format_dict["rate"]
        figures = [
            f"{progress.files:,} file{'' if progress.files == 1 else 's'}",
            _size(done, "B"),
            _size(rate, "B/s") if rate else "...",
        ]
        current = progress.current.removeprefix(self._root)
        if current:
            figures.append(os.fsdecode(current))
        bar.set_description_str(f"{self._name}: {', '.join(figures)}", refresh=False)
        # Feeds the rate, and draws the line (mininterval 0).
        bar.update(done - self._shown_bytes)
        self._shown_bytes = done

    def finish(self) -> None:
        """The last figures, then the line cleared (the summary follows)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            self._bar = bar
            self.refresh()
            self._bar = None
            bar.close()

    async def run(self) -> None:
        """Redraw until cancelled."""
        while True:
            await trio.sleep(REFRESH_SECONDS)
            self.refresh()


def _size(n: float, unit: str) -> str:
    return f"0{unit}" if n == 0 else tqdm.format_sizeof(n, unit)
