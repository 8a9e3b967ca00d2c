"""The example's files, shipped in the package, written out as a ready-to-run folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.resources import packaged_file

#: The example configuration's file name in a folder made by ``init_example``.
CONFIG_NAME = "rides.yaml"
#: Where ``init_example``'s configuration expects the model, relative to the folder.
MODEL_SUBDIR = Path("models") / "rides"


def example_files() -> dict[str, Path]:
    """Return the example's shipped files by the name they get in an example folder."""
    return {
        CONFIG_NAME: packaged_file(__package__ or "stream_scorer.example", CONFIG_NAME),
        "ride_request.v1.avsc": packaged_file(
            __package__ or "stream_scorer.example", "ride_request.v1.avsc"
        ),
        PREDICTION_SCHEMA_V1.name: PREDICTION_SCHEMA_V1,
    }


def init_example(dest: Path) -> Path:
    """Write the example's configuration and both schemas into ``dest``; return the config path.

    The configuration's relative paths point at the files beside it and at ``models/rides``
    (``stream-scorer train --out DEST/models/rides``). Existing files are replaced.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name, source in example_files().items():
        # atomic: a worker process starting meanwhile reads the old file or the new, never half
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=dest)
        os.close(fd)
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest / name)
    return dest / CONFIG_NAME


def cached_example() -> Path:
    """Write the example folder into the cache (``<cache>/example``); return its config path.

    Used by the demo and the benchmark; the model goes to ``<cache>/example/models/rides``.
    """
    from stream_scorer.devtools.localkafka import default_cache_dir

    return init_example(default_cache_dir() / "example")
