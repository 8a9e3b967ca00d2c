"""``stream-scorer model …``: publish, promote and roll back model versions; pack and check.

``STORE`` is ``store:<root>/<name>`` (a model store directory) or ``models:/<name>`` (an MLflow
Model Registry at ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``); a bare ``<name>`` with
``--store ROOT`` means ``store:ROOT/<name>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stream_scorer.cli.common import Commands, command, command_group
from stream_scorer.errors import ConfigError
from stream_scorer.model.store import (
    DEFAULT_ALIAS,
    MLFLOW_SCHEME,
    STORE_SCHEME,
    AliasStore,
    ModelStore,
    Move,
    open_store,
    promote,
    rollback,
)

#: The heading of these commands in ``stream-scorer --help``, and its rows (commands, summary).
TITLE = "Models"
ROWS = [(("model", "evaluate"), "versions: publish, promote, roll back; live metrics")]


def _store(args: argparse.Namespace) -> AliasStore:
    spec: str = args.store_name
    if not spec.startswith((STORE_SCHEME, MLFLOW_SCHEME)):
        if args.store is None:
            raise ConfigError(
                "STORE", f"{spec!r}: give store:<root>/<name>, models:/<name> or --store ROOT"
            )
        spec = f"{STORE_SCHEME}{args.store / spec}"
    return open_store(spec, tracking_uri=args.tracking_uri)


def _print_move(store: AliasStore, move: Move) -> None:
    print(f"{store.describe()}@{move.alias}: {move.before or '(unset)'} -> {move.after}")


def _cmd_promote(args: argparse.Namespace) -> int:
    store = _store(args)
    _print_move(store, promote(store, args.version, args.alias))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    _print_move(store, rollback(store, args.alias))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    store = _store(args)
    if isinstance(store, ModelStore):
        version = store.publish(args.dir)
    else:
        from stream_scorer.model.mlflow import MlflowModel

        assert isinstance(store, MlflowModel)
        version = store.publish(args.dir)
    print(f"{store.describe()}: published {args.dir} as version {version}")
    if args.promote:
        _print_move(store, promote(store, version, args.alias))
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from stream_scorer.model.pack import pack, parse_feature_flag, read_mapping
    from stream_scorer.stages.decode import load_schema

    if args.features and args.feature:
        raise ConfigError("--feature", "give --feature flags or --features FILE, not both")
    mapping = read_mapping(args.features) if args.features else None
    if args.feature:
        mapping = {"features": [parse_feature_flag(f) for f in args.feature]}
    manifest = pack(
        args.booster,
        load_schema(args.schema),
        args.out,
        mapping=mapping,
        version=args.version,
        sample=args.sample,
        threshold=args.threshold,
    )
    print(
        f"model {manifest.model_version} ({manifest.objective}, {len(manifest.features)} "
        f"features{', reference bins from ' + str(args.sample) if args.sample else ''}) "
        f"written to {args.out}",
        flush=True,
    )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from stream_scorer.model.pack import check
    from stream_scorer.stages.decode import load_schema

    manifest = check(args.dir, load_schema(args.schema))
    print(
        f"OK {args.dir}: model {manifest.model_version} ({manifest.objective}, "
        f"{len(manifest.features)} features) fits {args.schema}",
        flush=True,
    )
    return 0


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "store_name",
        metavar="STORE",
        help="store:<root>/<name>, models:/<name> (MLflow), or a name with --store",
    )
    parser.add_argument("--store", type=Path, help="the model store's root directory")
    parser.add_argument(
        "--tracking-uri", default="", help="MLflow server (default $MLFLOW_TRACKING_URI)"
    )


def add_commands(sub: Commands) -> None:
    """Add ``model publish|promote|rollback|pack|check`` to the command line."""
    model_sub = command_group(
        sub,
        "model",
        "model promote store:/srv/models/rides 7",
        help="model versions: publish, promote, rollback, pack, check",
    )

    publish = command(
        model_sub,
        "publish",
        "model publish rides/models/rides store:/srv/models/rides --promote",
        help="copy a model directory into a store (or register it in MLflow)",
    )
    publish.add_argument("dir", type=Path, help="model directory (manifest.json + model file)")
    _store_arguments(publish)
    publish.add_argument("--promote", action="store_true", help="then point the alias at it")
    publish.add_argument("--alias", default=DEFAULT_ALIAS)
    publish.set_defaults(func=_cmd_publish)

    prom = command(
        model_sub,
        "promote",
        "model promote models:/rides 7 --tracking-uri http://mlflow:5000",
        help="point an alias at a version",
    )
    _store_arguments(prom)
    prom.add_argument("version")
    prom.add_argument("--alias", default=DEFAULT_ALIAS)
    prom.set_defaults(func=_cmd_promote)

    back = command(
        model_sub,
        "rollback",
        "model rollback store:/srv/models/rides",
        help="point an alias back at the version it pointed at before",
    )
    _store_arguments(back)
    back.add_argument("--alias", default=DEFAULT_ALIAS)
    back.set_defaults(func=_cmd_rollback)

    pk = command(
        model_sub,
        "pack",
        "model pack booster.ubj --schema ride.avsc --out models/rides",
        help="write a model directory from a saved booster, the input schema and a feature "
        "mapping (exit 2 on any mismatch)",
    )
    pk.add_argument("booster", type=Path, help="saved booster: UBJSON or JSON")
    pk.add_argument("--schema", type=Path, required=True, help="the input Avro schema (.avsc)")
    pk.add_argument("--out", type=Path, required=True, help="model directory to write")
    pk.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="NAME=FIELD[:TRANSFORM[:CATS]]",
        help="one feature, in the booster's order (repeat); default: each booster feature from "
        "the field of its name",
    )
    pk.add_argument("--features", type=Path, help="a feature mapping file (YAML)")
    pk.add_argument("--version", default="", help="model version (default: name-date-sha)")
    pk.add_argument("--threshold", type=float, help="binary classifiers' label threshold")
    pk.add_argument(
        "--sample", type=Path, help="training sample (.avro, .csv, .parquet) for reference bins"
    )
    pk.set_defaults(func=_cmd_pack)

    ck = command(
        model_sub,
        "check",
        "model check models/rides --schema ride.avsc",
        help="the worker's checks of a model directory against an input schema (exit 2 on any "
        "problem)",
    )
    ck.add_argument("dir", type=Path, help="model directory")
    ck.add_argument("--schema", type=Path, required=True, help="the input Avro schema (.avsc)")
    ck.set_defaults(func=_cmd_check)
