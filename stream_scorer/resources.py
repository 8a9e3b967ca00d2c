"""Data files shipped inside the package, found with ``importlib.resources`` (never a checkout)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def packaged_file(package: str, name: str) -> Path:
    """Return the path of the data file ``name`` shipped in ``package``.

    The package is installed as files (a wheel or an editable install), so the resource is a
    real file that other processes (the JVM, a worker subprocess) can open by its path.

    Raises:
        FileNotFoundError: the file is not in the installed package (a broken installation).
    """
    path = Path(str(files(package).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"{name} is missing from the installed package {package}: {path}")
    return path
