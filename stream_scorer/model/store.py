"""Where models live: a plain directory, a model store directory, or an MLflow Model Registry.

``model.source`` names one of them:

- ``/path/to/model``: a model directory (``manifest.json`` + model file); it never changes.
- ``store:<root>/<name>@<alias>`` (or ``store:<root>/<name>/<version>``): a **model store**,
  ``<root>/<name>/<version>/`` one model directory per version, and
  ``<root>/<name>/aliases/<alias>`` a small text file holding the version an alias points at
  (written atomically: a temporary file renamed over it), with ``<alias>.history`` beside it
  (the versions it pointed at, oldest first, for ``rollback``).
- ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``): an **MLflow Model Registry**,
  read over its REST API (``model/mlflow.py``); no MLflow package needed.

Every source answers two questions (``ModelSource``): which version it points at now
(``wanted``: cheap, asked every ``model.refresh_s``) and where that version's directory is
(``fetch``: downloads it first when remote). ``promote`` and ``rollback`` move an alias of
either kind of store (``AliasStore``) and keep its history; the previous version stays where it
was, loadable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from stream_scorer.contracts.manifest import read_manifest
from stream_scorer.errors import ModelError
from stream_scorer.model.rollout import Rollout, parse
from stream_scorer.retry import DEFAULT_POLICY, RetryPolicy

#: The prefix of a model store source; ``models:/`` names a model in an MLflow model registry.
STORE_SCHEME: Final = "store:"
MLFLOW_SCHEME: Final = "models:/"
#: The alias ``promote`` moves when none is given.
DEFAULT_ALIAS: Final = "champion"
#: How many earlier versions an alias's history keeps (``rollback`` steps back through them).
HISTORY_LENGTH: Final = 20
ALIASES_DIR: Final = "aliases"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelSource(Protocol):
    """Where the worker's model comes from (``model.source``)."""

    @property
    def tracks(self) -> bool:
        """Whether the version it points at can change (an alias), so it is worth polling."""
        ...

    def describe(self) -> str:
        """The source as configured, for log lines and errors."""
        ...

    def wanted(self) -> str:
        """The version the source points at now.

        Raises:
            ModelError: the alias or version does not exist, or the store cannot be read.
        """
        ...

    def fetch(self, version: str) -> Path:
        """A local model directory holding ``version`` (downloaded first if need be).

        Raises:
            ModelError: the version cannot be found or read.
        """
        ...

    def rollout(self) -> Rollout | None:
        """The rollout record of the alias followed (None: none, or no alias).

        Raises:
            RolloutError: the record is malformed.
            ModelError: the store cannot be read.
        """
        ...

    def close(self) -> None:
        """Release what ``fetch`` downloaded."""
        ...


class AliasStore(Protocol):
    """A store whose aliases ``promote`` and ``rollback`` move (model store or MLflow)."""

    def describe(self) -> str:
        """The store and model, for messages."""
        ...

    def check_version(self, version: str) -> None:
        """Raise ``ModelError`` unless ``version`` exists in the store."""
        ...

    def get_alias(self, alias: str) -> str | None:
        """The version ``alias`` points at, or None when it is not set."""
        ...

    def set_alias(self, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``."""
        ...

    def get_history(self, alias: str) -> list[str]:
        """The versions ``alias`` pointed at before, oldest first."""
        ...

    def set_history(self, alias: str, versions: list[str]) -> None:
        """Replace ``alias``'s history."""
        ...

    def get_rollout(self, alias: str) -> str | None:
        """The stored rollout record of ``alias`` (its text), or None."""
        ...

    def set_rollout(self, alias: str, text: str | None) -> None:
        """Store ``alias``'s rollout record (None: remove it; the champion alone scores)."""
        ...

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold off other promotions of this model while an alias moves."""
        ...


@dataclass(frozen=True)
class Move:
    """What ``promote`` or ``rollback`` did: ``alias`` went from ``before`` to ``after``."""

    alias: str
    before: str | None
    after: str


def promote(store: AliasStore, version: str, alias: str = DEFAULT_ALIAS) -> Move:
    """Point ``alias`` at ``version``; the version it pointed at goes into its history.

    A rollout of the alias ends: the new champion scores every key.

    Raises:
        ModelError: the version does not exist in the store.
    """
    store.check_version(version)
    with store.locked():
        before = store.get_alias(alias)
        if before is not None and before != version:
            history = [*store.get_history(alias), before][-HISTORY_LENGTH:]
            store.set_history(alias, history)
        store.set_alias(alias, version)
        if store.get_rollout(alias) is not None:
            store.set_rollout(alias, None)
    return Move(alias, before, version)


def read_rollout(store: AliasStore, alias: str = DEFAULT_ALIAS) -> Rollout | None:
    """The rollout record of ``alias`` (None: the champion alone scores).

    Raises:
        RolloutError: the record is malformed.
    """
    text = store.get_rollout(alias)
    return None if text is None else parse(text, f"of {store.describe()}@{alias}")


def start_rollout(store: AliasStore, rollout: Rollout, alias: str = DEFAULT_ALIAS) -> Rollout:
    """Put ``rollout`` in force for ``alias`` (replacing any); returns it.

    Raises:
        ModelError: a version does not exist, or the alias does not point at the record's
            champion (it moved: make the record again).
    """
    for version in rollout.split().versions:
        store.check_version(version)
    with store.locked():
        champion = store.get_alias(alias)
        if champion != rollout.champion:
            raise ModelError(
                f"{store.describe()}@{alias} points at {champion}, not {rollout.champion}"
            )
        store.set_rollout(alias, rollout.to_json())
    return rollout


def rollback(store: AliasStore, alias: str = DEFAULT_ALIAS) -> Move:
    """End a rollout of ``alias`` (100% champion at once), else point it back one version.

    With a rollout in force (even a malformed one), only the rollout ends: the alias stays,
    ``Move.before == Move.after``. Otherwise each rollback steps one further back through the
    alias's history.

    Raises:
        ModelError: the alias has no earlier version (or that version is gone).
    """
    with store.locked():
        if store.get_rollout(alias) is not None:
            store.set_rollout(alias, None)
            champion = store.get_alias(alias)
            if champion is None:
                raise ModelError(f"{store.describe()}: alias {alias!r} is not set")
            return Move(alias, champion, champion)
        history = store.get_history(alias)
        before = store.get_alias(alias)
        if not history:
            raise ModelError(f"{store.describe()}: alias {alias!r} has no earlier version")
        previous = history[-1]
        store.check_version(previous)
        store.set_history(alias, history[:-1])
        store.set_alias(alias, previous)
    return Move(alias, before, previous)


# --- a plain directory ----------------------------------------------------------------------


class DirectorySource:
    """A model directory: one version, forever (``model.path``, or a plain ``model.source``)."""

    tracks = False

    def __init__(self, path: Path) -> None:
        """Use the model in ``path``."""
        self.path = path

    def describe(self) -> str:
        """The directory."""
        return str(self.path)

    def wanted(self) -> str:
        """The directory's name (it never changes)."""
        return self.path.name

    def fetch(self, version: str) -> Path:
        """The directory itself."""
        return self.path

    def rollout(self) -> Rollout | None:
        """None: a directory has no rollout."""
        return None

    def close(self) -> None:
        """Nothing to release."""


# --- a model store directory ----------------------------------------------------------------


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ModelError(
            f"{kind} {value!r}: use letters, digits, '.', '_' and '-' (not first), nothing else"
        )
    return value


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old content or the new, never half.

    A temporary file in the same directory, flushed to disk, renamed over ``path``.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ModelStore:
    """``<root>/<name>/<version>/`` model directories with alias files (see the module doc)."""

    def __init__(self, root: Path, name: str) -> None:
        """The model ``name`` of the store at ``root``."""
        self.root = root
        self.name = _check_name("model name", name)
        self.model_dir = root / name
        self.aliases = self.model_dir / ALIASES_DIR

    def describe(self) -> str:
        """``store:<root>/<name>``."""
        return f"{STORE_SCHEME}{self.model_dir}"

    def version_dir(self, version: str) -> Path:
        """The directory of ``version``."""
        return self.model_dir / _check_name("version", version)

    def versions(self) -> list[str]:
        """The versions in the store, by name."""
        if not self.model_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.model_dir.iterdir()
            if not p.name.startswith(".") and (p / "manifest.json").is_file()
        )

    def publish(self, model_dir: Path) -> str:
        """Copy a model directory into the store as the version its manifest names.

        Returns the version. The copy is made beside and renamed into place, so a reader never
        sees half a version; a version already there is refused (versions are immutable).

        Raises:
            ModelError: no valid manifest, or the version exists.
        """
        version = _check_name("version", read_manifest(model_dir).model_version)
        target = self.version_dir(version)
        if target.exists():
            raise ModelError(f"{self.describe()}: version {version!r} exists already")
        self.model_dir.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.model_dir))
        try:
            shutil.copytree(model_dir, partial, dirs_exist_ok=True)
            os.rename(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return version

    def check_version(self, version: str) -> None:
        """Raise ``ModelError`` unless ``version`` is a readable model directory."""
        path = self.version_dir(version)
        if not path.is_dir():
            known = ", ".join(self.versions()) or "none"
            raise ModelError(f"{self.describe()}: no version {version!r} (versions: {known})")
        read_manifest(path)

    def _alias_file(self, alias: str) -> Path:
        return self.aliases / _check_name("alias", alias)

    def get_alias(self, alias: str) -> str | None:
        """The version ``alias`` points at, or None."""
        try:
            text = self._alias_file(alias).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ModelError(f"{self.describe()}: cannot read alias {alias!r}: {exc}") from exc
        return text or None

    def set_alias(self, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (atomically)."""
        self.aliases.mkdir(parents=True, exist_ok=True)
        write_atomically(self._alias_file(alias), version + "\n")

    def get_history(self, alias: str) -> list[str]:
        """The versions ``alias`` pointed at before, oldest first."""
        path = self.aliases / f"{_check_name('alias', alias)}.history"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{self.describe()}: cannot read {path}: {exc}") from exc
        return [str(v) for v in raw] if isinstance(raw, list) else []

    def set_history(self, alias: str, versions: list[str]) -> None:
        """Replace ``alias``'s history (atomically)."""
        self.aliases.mkdir(parents=True, exist_ok=True)
        write_atomically(self.aliases / f"{alias}.history", json.dumps(versions) + "\n")

    def get_rollout(self, alias: str) -> str | None:
        """``aliases/<alias>.rollout.json``'s text, or None."""
        path = self.aliases / f"{_check_name('alias', alias)}.rollout.json"
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ModelError(f"{self.describe()}: cannot read {path}: {exc}") from exc

    def set_rollout(self, alias: str, text: str | None) -> None:
        """Write (or remove) ``aliases/<alias>.rollout.json``; log it in ``.rollout.log``."""
        self.aliases.mkdir(parents=True, exist_ok=True)
        path = self.aliases / f"{_check_name('alias', alias)}.rollout.json"
        if text is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            write_atomically(path, text + "\n")
        with (self.aliases / f"{alias}.rollout.log").open("a", encoding="utf-8") as fh:
            fh.write((text or json.dumps({"ended": True})) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on the model's aliases (``flock`` on ``aliases/.lock``)."""
        self.aliases.mkdir(parents=True, exist_ok=True)
        with (self.aliases / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class StoreRef:
    """A parsed ``store:`` or ``models:/`` source: the model, and an alias or a version."""

    location: str
    name: str
    alias: str | None
    version: str | None


def parse_ref(spec: str) -> StoreRef:
    """Split ``store:<root>/<name>@<alias>`` / ``models:/<name>/<version>`` (and the like).

    Raises:
        ModelError: the text is neither form.
    """
    if spec.startswith(MLFLOW_SCHEME):
        rest, location = spec[len(MLFLOW_SCHEME) :], ""
    elif spec.startswith(STORE_SCHEME):
        rest = spec[len(STORE_SCHEME) :]
        location, _, rest = rest.rstrip("/").rpartition("/")
        if "@" not in rest:  # <root>/<name>/<version>
            location, _, name = location.rpartition("/")
            rest = f"{name}/{rest}"
        if not location:
            raise ModelError(f"model source {spec!r}: give store:<root>/<name>@<alias>")
    else:
        raise ModelError(f"model source {spec!r} is neither store:… nor models:/…")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        return StoreRef(
            location, _check_name("model name", name), _check_name("alias", alias), None
        )
    name, _, version = rest.partition("/")
    if not version:
        raise ModelError(f"model source {spec!r}: name an alias (@champion) or a version")
    return StoreRef(
        location, _check_name("model name", name), None, _check_name("version", version)
    )


class StoreSource:
    """A model store's alias (or pinned version) as the worker's model source."""

    def __init__(self, store: ModelStore, alias: str | None, version: str | None) -> None:
        """Follow ``alias`` (or stay on ``version``) of ``store``."""
        self.store = store
        self.alias = alias
        self.version = version

    @property
    def tracks(self) -> bool:
        """An alias can move; a pinned version cannot."""
        return self.alias is not None

    def describe(self) -> str:
        """``store:<root>/<name>@<alias>`` or ``…/<version>``."""
        tail = f"@{self.alias}" if self.alias else f"/{self.version}"
        return self.store.describe() + tail

    def wanted(self) -> str:
        """The version the alias points at now (or the pinned version)."""
        if self.alias is None:
            assert self.version is not None
            return self.version
        version = self.store.get_alias(self.alias)
        if version is None:
            raise ModelError(f"{self.describe()}: alias {self.alias!r} is not set")
        return version

    def fetch(self, version: str) -> Path:
        """The version's directory in the store."""
        path = self.store.version_dir(version)
        if not path.is_dir():
            raise ModelError(f"{self.describe()}: no version {version!r} at {path}")
        return path

    def rollout(self) -> Rollout | None:
        """The alias's rollout record (``aliases/<alias>.rollout.json``), or None."""
        return None if self.alias is None else read_rollout(self.store, self.alias)

    def close(self) -> None:
        """Nothing to release."""


def open_store(spec: str, *, tracking_uri: str = "") -> AliasStore:
    """The alias store a ``store:<root>/<name>`` or ``models:/<name>`` text names.

    ``spec`` may also end with ``@alias`` or a version, which is ignored here.
    """
    if spec.startswith(MLFLOW_SCHEME):
        from stream_scorer.model.mlflow import MlflowRegistry

        name = spec[len(MLFLOW_SCHEME) :].partition("@")[0].partition("/")[0]
        return MlflowRegistry.from_environment(tracking_uri).model(_check_name("model name", name))
    if spec.startswith(STORE_SCHEME):
        path = Path(spec[len(STORE_SCHEME) :].partition("@")[0]).expanduser()
        return ModelStore(path.parent, path.name)
    raise ModelError(f"{spec!r}: give store:<root>/<name> or models:/<name>")


def open_source(
    spec: str,
    *,
    base: Path | None = None,
    tracking_uri: str = "",
    retry_deadline_s: float = 0.0,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> ModelSource:
    """The model source ``model.source`` names (see the module doc).

    Args:
        spec: the source text.
        base: what a relative directory or store root is relative to (the config's folder).
        tracking_uri: the MLflow tracking server (else ``$MLFLOW_TRACKING_URI``).
        retry_deadline_s: how long an MLflow read is asked again while the server does not
            answer (``retry.model_registry_timeout_s``; a store on disk has no outage).
        policy: the backoff between those tries.

    Raises:
        ModelError: the text names no usable source.
    """
    base = base or Path.cwd()
    if spec.startswith(MLFLOW_SCHEME):
        from stream_scorer.model.mlflow import MlflowSource

        ref = parse_ref(spec)
        return MlflowSource(
            ref.name,
            ref.alias,
            ref.version,
            tracking_uri=tracking_uri,
            retry_deadline_s=retry_deadline_s,
            policy=policy,
        )
    if spec.startswith(STORE_SCHEME):
        ref = parse_ref(spec)
        root = Path(ref.location).expanduser()
        root = root if root.is_absolute() else base / root
        return StoreSource(ModelStore(root, ref.name), ref.alias, ref.version)
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_dir():
        raise ModelError(f"model source {spec!r}: no such directory: {path}")
    return DirectorySource(path)
