"""The CLI's output folder: checked before any work, staged beside ``--out``, moved in whole at the end.

    out = OutputFolder(args.out, overwrite=args.overwrite)  # checks only: ValueError, nothing made
    staging = out.stage()   # the temporary folder beside --out: proves the location writable
    try:
        ...                 # the run, writing into ``staging``
        out.commit()        # staging becomes --out (an existing one is replaced as a whole)
    finally:
        out.discard()       # after a failure or an interrupt: the staging folder and made parents go

"Existing" means a non-empty folder: an empty one is used as if absent, and filled in place (its inode kept:
``--out .`` in an empty folder leaves the shell that ran it where its files are). Replacing one needs
``overwrite`` and is refused for a folder holding anything this CLI does not write (see :data:`OUTPUT_NAMES`), so a
mistyped ``--out ~ --overwrite`` cannot delete a home directory, and for the current folder or one holding it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

# every name the CLI writes into --out (cli.run): what --overwrite may replace
OUTPUT_NAMES = re.compile(r"(report\.json|report\.png|report_memory_map\.png|latents_[a-z0-9_]+\.pt"
                          r"|video_[a-z0-9_]+\.mp4)")


HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held():
    """SIGINT and SIGTERM are ignored inside (main thread only): a Ctrl-C or a stop cannot cut a move or a clean-up
    in half.

    Both take milliseconds; an interrupt in them is dropped rather than re-raised after, so a run whose
    outputs were moved in reports success, and a clean-up always finishes.
    """
    previous = [signal.getsignal(sig) for sig in HELD]
    # signals can be set from the main thread only; None: a handler not installed from Python (cannot be put back)
    if threading.current_thread() is not threading.main_thread() or None in previous:
        yield
        return
    for sig in HELD:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in zip(HELD, previous):
            signal.signal(sig, handler)


def _make_unique(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/prefix<random>`` with the umask's permissions (``tempfile.mkdtemp`` makes
    0700 folders, and this one becomes --out)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


class OutputFolder:
    """``--out`` for one run (see the module docstring); ``label`` names it as the user typed it."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.label = f"--out {str(out)!r}"
        self.path = Path(os.path.realpath(out))  # a symlinked --out: its target is replaced, not the link
        self.overwrite = overwrite
        self.staging: Path | None = None
        self._made: list[Path] = []  # missing parents this run created, outermost first
        self.check()

    def _foreign(self) -> list[str]:
        """Entries of an existing --out that this CLI does not write."""
        return sorted(e.name for e in os.scandir(self.path) if not (e.is_file(follow_symlinks=False)
                                                                  and OUTPUT_NAMES.fullmatch(e.name)))

    def _refusal(self) -> str | None:
        """Why the existing --out may not be replaced now (None: it is absent or empty, or may be replaced)."""
        if not self.path.is_dir() or not any(os.scandir(self.path)):
            return None
        cwd = Path(os.path.realpath(os.getcwd()))
        if self.path == cwd or self.path in cwd.parents:
            return (f"{self.label} is not empty and is the current folder or holds it: replacing it would leave "
                    "this shell in a deleted folder; choose another folder")
        if not self.overwrite:
            return (f"{self.label} is not empty (a previous run's outputs?): pass --overwrite to replace it as a "
                    "whole, or choose another folder")
        foreign = self._foreign()
        if foreign:
            shown = ", ".join(map(repr, foreign[:3])) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            return (f"{self.label} holds {shown}, which relaxkv-generate did not write: --overwrite replaces only "
                    "a folder of its own outputs; choose another folder or empty it yourself")
        return None

    def check(self) -> None:
        """ValueError unless --out is absent, an empty folder, or (with ``overwrite``) a folder of this CLI's
        outputs, with every existing parent a writable folder. Makes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.label} exists and is not a folder")
        existing = self.path if self.path.exists() else next(p for p in self.path.parents if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{self.label}: {str(existing)!r} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{self.label}: {str(existing)!r} is not writable")
        refusal = self._refusal()
        if refusal:
            raise ValueError(refusal)

    def stage(self) -> Path:
        """Makes the missing parents and an empty temporary folder beside --out, and returns it: the proof that
        the location is writable (``os.access`` can say yes where nothing can be made, e.g. under /proc).
        ValueError (nothing left behind) if it cannot be made."""
        try:
            for parent in reversed(self.path.parents):
                if not parent.exists():
                    parent.mkdir()
                    self._made.append(parent)
            self.staging = _make_unique(self.path.parent, f".{self.path.name}.tmp-")
        except OSError as exc:
            self.discard()
            where = Path(exc.filename).parent if exc.filename else self.path.parent
            raise ValueError(f"{self.label}: cannot make a folder in {str(where)!r} ({exc.strerror or exc})") from None
        return self.staging

    def commit(self) -> None:
        """Moves the staging folder to --out: renamed in (an absent or empty --out), or swapped with an existing
        --out (with ``overwrite``), which is then deleted. Refused (ValueError, the staging folder kept and
        named) if --out was filled during the run with what may not be replaced."""
        staging = self.staging
        with interrupts_held():
            if self._refusal():
                self.staging = None  # keep this run's outputs: the message says where they are
                raise ValueError(f"{self.label} was filled during this run with what may not be replaced "
                                 f"({', '.join(map(repr, self._foreign()[:3])) or 'outputs, without --overwrite'}); "
                                 f"this run's outputs are in {str(staging)!r}")
            if not self.path.is_dir():
                os.replace(staging, self.path)
            elif not any(os.scandir(self.path)):  # filled in place: the folder (and a shell sitting in it) stays
                for entry in os.scandir(staging):
                    os.replace(entry.path, self.path / entry.name)
                staging.rmdir()
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
                os.replace(self.path, old)
                try:
                    os.replace(staging, self.path)
                except BaseException:
                    os.replace(old, self.path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            self.staging, self._made = None, []

    def discard(self) -> None:
        """Removes the staging folder and the parents this run made (if still empty); no-op after a commit."""
        with interrupts_held():
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            for parent in reversed(self._made):
                with contextlib.suppress(OSError):
                    parent.rmdir()
            self._made = []
