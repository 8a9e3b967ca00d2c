"""An MLflow Model Registry over its REST API, with the standard library only.

The worker reads ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``) without the
``mlflow`` package: the alias lookup (``registered-models/alias``), the version's download URI
(``model-versions/get-download-uri``) and the artifacts served by the tracking server
(``mlflow-artifacts/artifacts``, a server started with ``--serve-artifacts``: the default).
``promote``/``rollback`` (``store.py``) move the alias and keep its history in a registered
model tag (``stream_scorer.alias_history.<alias>``, a JSON list), since MLflow keeps none.

The server is ``model.mlflow_tracking_uri`` or ``$MLFLOW_TRACKING_URI``; basic auth from
``$MLFLOW_TRACKING_USERNAME`` / ``$MLFLOW_TRACKING_PASSWORD`` when set (MLflow's own names).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from stream_scorer.contracts.manifest import read_manifest
from stream_scorer.errors import ModelError, UnavailableError, http_refusal, refused
from stream_scorer.model.rollout import Rollout, parse
from stream_scorer.retry import DEFAULT_POLICY, RetryPolicy, retrying
from stream_scorer.urls import split_userinfo

API: Final = "/api/2.0/mlflow"
ARTIFACTS_API: Final = "/api/2.0/mlflow-artifacts/artifacts"
HISTORY_TAG: Final = "stream_scorer.alias_history."
#: The registered-model tag holding an alias's rollout record (``model/rollout.py``).
ROLLOUT_TAG: Final = "stream_scorer.rollout."
#: Seconds one HTTP request may take.
TIMEOUT_S: Final = 30.0


class MlflowRegistry:
    """A tracking server's model registry and artifact proxy."""

    def __init__(
        self,
        uri: str,
        *,
        username: str = "",
        password: str = "",
        timeout_s: float = TIMEOUT_S,
        retry_deadline_s: float = 0.0,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        """Talk to the server at ``uri`` (``http(s)://host:port``).

        Credentials in ``uri`` (``http://user:password@host``) are used when ``username`` and
        ``password`` are not given, and never kept in ``uri``. A read (``GET``) the server does
        not answer is asked again by ``policy`` for ``retry_deadline_s``
        (``retry.model_registry_timeout_s``; 0: once); a write is sent once.
        """
        uri, url_user, url_password = split_userinfo(uri)
        username, password = username or url_user, password or url_password
        if not uri.startswith(("http://", "https://")):
            raise ModelError(
                f"MLflow tracking URI {uri!r}: give http(s)://host:port "
                "(model.mlflow_tracking_uri or $MLFLOW_TRACKING_URI)"
            )
        self.uri = uri.rstrip("/")
        self.principal = username
        self.timeout_s = timeout_s
        self.retry_deadline_s = retry_deadline_s
        self.policy = policy
        self._auth = ""
        if username or password:
            token = base64.b64encode(f"{username}:{password}".encode()).decode()
            self._auth = f"Basic {token}"

    @classmethod
    def from_environment(
        cls,
        uri: str = "",
        environ: Mapping[str, str] | None = None,
        *,
        retry_deadline_s: float = 0.0,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> MlflowRegistry:
        """The server at ``uri`` or ``$MLFLOW_TRACKING_URI``, with basic auth from the env.

        ``retry_deadline_s`` and ``policy``: see ``__init__``.
        """
        env = os.environ if environ is None else environ
        uri = uri or env.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise ModelError(
                "no MLflow server: set model.mlflow_tracking_uri or MLFLOW_TRACKING_URI"
            )
        return cls(
            uri,
            username=env.get("MLFLOW_TRACKING_USERNAME", ""),
            password=env.get("MLFLOW_TRACKING_PASSWORD", ""),
            retry_deadline_s=retry_deadline_s,
            policy=policy,
        )

    def model(self, name: str) -> MlflowModel:
        """The registered model ``name`` (an ``AliasStore``)."""
        return MlflowModel(self, name)

    # --- HTTP -----------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        data: bytes | None = None,
    ) -> bytes:
        """One request; returns the response body.

        A ``GET`` is asked again while the server does not answer (``retry_deadline_s``).

        Raises:
            RefusedError: the server refused the credentials (401) or forbade the request (403):
                a configuration error (exit 2).
            MlflowError: the server answered another 4xx (its message; 404 and 400 are how
                MLflow says "no such model, version or alias").
            UnavailableError: the server is unreachable or answered 408, 429 or 5xx (exit 1 at
                start-up: a restart may help; a running worker asks again later).
        """
        deadline = self.retry_deadline_s if method == "GET" else 0.0
        what = f"{method} {path}"
        attempts = retrying(deadline, what, server="MLflow server", policy=self.policy)
        return attempts(self._request_once, method, path, query, body, data)

    def _request_once(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Any,
        data: bytes | None,
    ) -> bytes:
        url = self.uri + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": self._auth} if self._auth else {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                out: bytes = resp.read()
                return out
        except urllib.error.HTTPError as exc:
            detail, code = exc.read().decode(errors="replace")[:500], ""
            with contextlib.suppress(ValueError, AttributeError):
                answer = json.loads(detail)
                detail, code = answer.get("message", detail), answer.get("error_code", "")
            if exc.code in (401, 403):  # the credentials: asking again cannot help
                raise refused(
                    "MLFLOW_TRACKING_USERNAME",
                    "MLflow server",
                    self.uri,
                    exc.code,
                    self.principal,
                    detail,
                    f"{method} {path}",
                ) from exc
            if not http_refusal(exc.code) and exc.code != 404:  # 5xx, 408, 429: an outage
                raise UnavailableError(
                    f"MLflow server {self.uri} answered {method} {path} with HTTP {exc.code}: "
                    f"{detail}"
                ) from exc
            raise MlflowError(
                f"MLflow {method} {path}: HTTP {exc.code}: {detail}", exc.code, code
            ) from exc
        except (urllib.error.URLError, OSError) as exc:  # may pass: not a deployment error
            raise UnavailableError(f"MLflow server {self.uri} unreachable: {exc}") from exc

    def call(
        self,
        method: str,
        endpoint: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> dict[str, Any]:
        """A model registry API call (``/api/2.0/mlflow/<endpoint>``) returning its JSON object."""
        raw = self.request(method, f"{API}/{endpoint}", query=query, body=body)
        try:
            out = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise ModelError(f"MLflow {endpoint}: the answer is not JSON: {exc}") from exc
        if not isinstance(out, dict):
            raise ModelError(f"MLflow {endpoint}: the answer is not a JSON object")
        return out

    # --- artifacts ------------------------------------------------------------------------
    def artifact_path(self, uri: str) -> str:
        """The proxied artifact path of an ``mlflow-artifacts:`` URI."""
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme != "mlflow-artifacts":
            raise ModelError(
                f"artifact URI {uri!r}: only mlflow-artifacts: URIs (a server started with "
                "--serve-artifacts) can be read without the mlflow package"
            )
        return parsed.path.strip("/")

    def list_artifacts(self, path: str) -> list[tuple[str, bool]]:
        """``(path, is_dir)`` of each entry right under ``path``."""
        raw = json.loads(self.request("GET", ARTIFACTS_API, query={"path": path}) or b"{}")
        out = []
        for entry in raw.get("files", []):
            name = str(entry["path"]).rsplit("/", 1)[-1]
            out.append((f"{path}/{name}" if path else name, bool(entry.get("is_dir"))))
        return out

    def download(self, path: str, into: Path) -> None:
        """Download the artifact directory ``path`` (recursively) into ``into``."""
        into.mkdir(parents=True, exist_ok=True)
        for entry, is_dir in self.list_artifacts(path):
            target = into / entry.rsplit("/", 1)[-1]
            if is_dir:
                self.download(entry, target)
            else:
                quoted = urllib.parse.quote(entry)
                target.write_bytes(self.request("GET", f"{ARTIFACTS_API}/{quoted}"))

    def upload(self, directory: Path, path: str) -> None:
        """Upload every file of ``directory`` to the artifact directory ``path``."""
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = file.relative_to(directory).as_posix()
            quoted = urllib.parse.quote(f"{path}/{rel}")
            self.request("PUT", f"{ARTIFACTS_API}/{quoted}", data=file.read_bytes())


class MlflowError(ModelError):
    """The MLflow server answered a request with an error.

    Attributes:
        status: the HTTP status.
        code: MLflow's ``error_code`` (``RESOURCE_DOES_NOT_EXIST``, ...), if it gave one.
    """

    def __init__(self, message: str, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class MlflowModel:
    """One registered model: its versions, aliases and alias history (an ``AliasStore``)."""

    def __init__(self, model_registry: MlflowRegistry, name: str) -> None:
        """The registered model ``name`` of ``model_registry``."""
        self.model_registry = model_registry
        self.name = name

    def describe(self) -> str:
        """``models:/<name> at <server>``."""
        return f"models:/{self.name} at {self.model_registry.uri}"

    def check_version(self, version: str) -> None:
        """Raise ``ModelError`` unless the version exists."""
        self.model_registry.call(
            "GET", "model-versions/get", query={"name": self.name, "version": version}
        )

    def get_alias(self, alias: str) -> str | None:
        """The version ``alias`` points at, or None."""
        try:
            got = self.model_registry.call(
                "GET", "registered-models/alias", query={"name": self.name, "alias": alias}
            )
        except MlflowError as exc:
            # an unset alias: INVALID_PARAMETER_VALUE "... alias X not found" (MLflow 3)
            if exc.status == 404 or (
                exc.code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)
            ):
                return None
            raise
        return str(got["model_version"]["version"])

    def set_alias(self, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``."""
        self.model_registry.call(
            "POST",
            "registered-models/alias",
            body={"name": self.name, "alias": alias, "version": version},
        )

    def _tags(self) -> dict[str, str]:
        got = self.model_registry.call("GET", "registered-models/get", query={"name": self.name})
        return {t["key"]: t["value"] for t in got["registered_model"].get("tags", [])}

    def get_rollout(self, alias: str) -> str | None:
        """The registered-model tag ``stream_scorer.rollout.<alias>``, or None."""
        return self._tags().get(ROLLOUT_TAG + alias) or None

    def set_rollout(self, alias: str, text: str | None) -> None:
        """Set (or delete) the rollout tag of ``alias``."""
        if text is None:
            with contextlib.suppress(MlflowError):  # not set: nothing to delete
                self.model_registry.call(
                    "DELETE",
                    "registered-models/delete-tag",
                    body={"name": self.name, "key": ROLLOUT_TAG + alias},
                )
            return
        self.model_registry.call(
            "POST",
            "registered-models/set-tag",
            body={"name": self.name, "key": ROLLOUT_TAG + alias, "value": text},
        )

    def get_history(self, alias: str) -> list[str]:
        """The versions ``alias`` pointed at before (a registered model tag), oldest first."""
        raw = self._tags().get(HISTORY_TAG + alias)
        try:
            versions = json.loads(raw) if raw else []
        except json.JSONDecodeError:
            versions = []
        return [str(v) for v in versions] if isinstance(versions, list) else []

    def set_history(self, alias: str, versions: list[str]) -> None:
        """Replace ``alias``'s history."""
        self.model_registry.call(
            "POST",
            "registered-models/set-tag",
            body={"name": self.name, "key": HISTORY_TAG + alias, "value": json.dumps(versions)},
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """No lock: the model registry has none (two promoters at once may interleave histories)."""
        yield

    def download_path(self, version: str) -> str:
        """The proxied artifact path of ``version``'s files."""
        got = self.model_registry.call(
            "GET", "model-versions/get-download-uri", query={"name": self.name, "version": version}
        )
        return self.model_registry.artifact_path(str(got["artifact_uri"]))

    def publish(self, model_dir: Path, experiment: str = "stream-scorer") -> str:
        """Upload a model directory and register it as a new version; return the version.

        The files are logged as the artifacts (``model/``) of a new run of ``experiment``
        (created if need be): MLflow registers a version only from a run's artifacts.
        """
        manifest = read_manifest(model_dir)
        reg = self.model_registry
        with contextlib.suppress(MlflowError):  # it exists already
            reg.call("POST", "registered-models/create", body={"name": self.name})
        try:
            found = reg.call(
                "GET", "experiments/get-by-name", query={"experiment_name": experiment}
            )
            experiment_id = str(found["experiment"]["experiment_id"])
        except MlflowError as exc:
            if exc.status != 404:
                raise
            made = reg.call("POST", "experiments/create", body={"name": experiment})
            experiment_id = str(made["experiment_id"])
        run = reg.call(
            "POST",
            "runs/create",
            body={"experiment_id": experiment_id, "run_name": manifest.model_version},
        )["run"]["info"]
        source = f"{run['artifact_uri']}/model"
        reg.upload(model_dir, reg.artifact_path(source))
        reg.call("POST", "runs/update", body={"run_id": run["run_id"], "status": "FINISHED"})
        got = reg.call(
            "POST",
            "model-versions/create",
            body={
                "name": self.name,
                "source": source,
                "run_id": run["run_id"],
                "description": f"stream-scorer model {manifest.model_version}",
            },
        )
        return str(got["model_version"]["version"])


class MlflowSource:
    """``models:/<name>@<alias>`` (or a version) as the worker's model source."""

    def __init__(
        self,
        name: str,
        alias: str | None,
        version: str | None,
        *,
        tracking_uri: str = "",
        retry_deadline_s: float = 0.0,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        """Follow ``alias`` (or stay on ``version``) of the registered model ``name``.

        ``retry_deadline_s`` and ``policy``: the reads' retry (``MlflowRegistry``).
        """
        registry = MlflowRegistry.from_environment(
            tracking_uri, retry_deadline_s=retry_deadline_s, policy=policy
        )
        self.model = registry.model(name)
        self.alias = alias
        self.version = version
        self._cache = Path(tempfile.mkdtemp(prefix="stream-scorer-mlflow-"))

    @property
    def tracks(self) -> bool:
        """An alias can move; a pinned version cannot."""
        return self.alias is not None

    def describe(self) -> str:
        """``models:/<name>@<alias>`` (or ``/<version>``)."""
        tail = f"@{self.alias}" if self.alias else f"/{self.version}"
        return f"models:/{self.model.name}{tail}"

    def wanted(self) -> str:
        """The version the alias points at now (or the pinned version)."""
        if self.alias is None:
            assert self.version is not None
            return self.version
        version = self.model.get_alias(self.alias)
        if version is None:
            raise ModelError(f"{self.describe()}: alias {self.alias!r} is not set")
        return version

    def rollout(self) -> Rollout | None:
        """The alias's rollout record (a registered-model tag), or None."""
        if self.alias is None:
            return None
        text = self.model.get_rollout(self.alias)
        return None if text is None else parse(text, f"of {self.describe()}")

    def fetch(self, version: str) -> Path:
        """Download ``version``'s files (once) and return their directory."""
        target = self._cache / version
        if (target / "manifest.json").is_file():
            return target
        partial = self._cache / f".{version}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.model.model_registry.download(self.model.download_path(version), partial)
        os.replace(partial, target)
        return target

    def close(self) -> None:
        """Delete the downloads."""
        shutil.rmtree(self._cache, ignore_errors=True)
