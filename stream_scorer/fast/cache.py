"""Where numba caches the fast path's machine code, whether it can, and where it came from.

numba keys its cache on the absolute path of the source file (``fast/kernel.py``, wherever the
package is installed) and writes it under ``$NUMBA_CACHE_DIR``, else under ``numba/`` in the
stream-scorer cache folder (``$STREAM_SCORER_CACHE`` or ``~/.cache/stream-scorer``). When that
folder cannot be written, numba would look elsewhere (beside the installed package, the user's
home) and, when nothing is writable, ``cache=True`` raises at decoration. Instead the kernel
compiles in memory (``cache=False``, a few seconds per process) and this module logs one
warning.

``$STREAM_SCORER_NUMBA_SEED`` names a folder holding a cache compiled earlier (the image's,
compiled at build time): when the cache folder holds no cache yet, the seed is copied into it
first. A cache folder must be writable even to be read (numba checks so before loading), so a
read-only image cannot use its baked cache in place; the seed fills a writable volume instead.

No numba import here: the configuration imports ``SEED_ENV``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The environment variable naming a cache compiled earlier, copied into an empty cache folder.
SEED_ENV = "STREAM_SCORER_NUMBA_SEED"


def cache_dir() -> Path:
    """Return numba's cache folder: ``$NUMBA_CACHE_DIR``, else ``numba/`` in our cache folder."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("STREAM_SCORER_CACHE") or str(Path.home() / ".cache" / "stream-scorer")
    return Path(base) / "numba"


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and a file can be written in it (numba's test)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def seed(target: Path, source: Path) -> bool:
    """Copy the cache in ``source`` into ``target`` when ``target`` holds none; True if copied.

    Files are copied to temporary names and renamed, as numba writes them, so a worker starting
    beside another never reads half a file.
    """
    if not source.is_dir() or any(target.rglob("*.nbi")):
        return False
    copied = False
    for src in source.rglob("*"):
        if not src.is_file():
            continue
        dst = target / src.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        copied = True
    return copied


def prepare(source_file: str, subpath: str) -> bool:
    """Point numba at the cache folder, seed it, and say whether ``cache=True`` can be used.

    Args:
        source_file: the compiled functions' source file (for the warning).
        subpath: the folder numba uses inside the cache folder for that file
            (``_CacheLocator.get_suitable_cache_subpath``): it must be writable too.

    Returns:
        True when numba can cache there; False (after one warning) when it must compile in
        memory.
    """
    import numba

    folder = cache_dir()
    numba.config.CACHE_DIR = str(folder)  # type: ignore[attr-defined]
    if not _writable(folder / subpath):
        log.warning(
            "numba cache folder %s is not writable: the fast path's kernel is compiled in memory "
            "at every start (a few seconds); point NUMBA_CACHE_DIR at a writable folder",
            folder,
        )
        return False
    seed_from = os.environ.get(SEED_ENV)
    if seed_from:
        try:
            if seed(folder, Path(seed_from)):
                log.info("numba cache: copied the cache in %s into %s", seed_from, folder)
        except OSError as exc:  # a cold cache is slower, not broken
            log.warning("numba cache: could not copy %s into %s: %s", seed_from, folder, exc)
    return True


def origin(dispatchers: Iterable[Any], cached: bool) -> str:
    """Where the machine code the dispatchers have run came from, for the start-up log."""
    hits = misses = 0
    for dispatcher in dispatchers:
        with contextlib.suppress(AttributeError):
            stats = dispatcher.stats
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    if not cached:
        return "compiled in memory (numba cache not writable)"
    if misses == 0 and hits > 0:
        return "loaded from numba's cache"
    return f"compiled ({misses} cache misses, {hits} hits; now cached)"
