"""``stream-scorer model …``: publish, promote and roll back model versions; pack and check.

``STORE`` is ``store:<root>/<name>`` (a model store directory) or ``models:/<name>`` (an MLflow
Model Registry at ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``); a bare ``<name>`` with
``--store ROOT`` means ``store:ROOT/<name>``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

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
    read_rollout,
    rollback,
    start_rollout,
)

log = logging.getLogger(__name__)

#: The heading of these commands in ``stream-scorer --help``, and its rows (commands, summary).
TITLE = "Models"
ROWS = [(("model", "evaluate"), "publish, promote, roll out/back, compare; outcomes")]


def _store(args: argparse.Namespace) -> AliasStore:
    spec: str = args.store_name
    if "@" in spec.rpartition("/")[2]:  # STORE@alias: the alias, unless --alias names one
        spec, _, alias = spec.rpartition("@")
        if getattr(args, "alias", DEFAULT_ALIAS) == DEFAULT_ALIAS:
            args.alias = alias
    if not spec.startswith((STORE_SCHEME, MLFLOW_SCHEME)):
        if args.store is None:
            raise ConfigError(
                "STORE", f"{spec!r}: give store:<root>/<name>, models:/<name> or --store ROOT"
            )
        spec = f"{STORE_SCHEME}{args.store / spec}"
    return open_store(spec, tracking_uri=args.tracking_uri)


def _print_move(store: AliasStore, move: Move) -> None:
    print(f"{store.describe()}@{move.alias}: {move.before or '(unset)'} -> {move.after}")
    _print_in_force(store, move.alias)


def _print_in_force(store: AliasStore, alias: str) -> None:
    """What scores now: the champion alone, or the rollout's split (and who set it)."""
    champion = store.get_alias(alias)
    record = read_rollout(store, alias)
    where = f"{store.describe()}@{alias}"
    if record is None or record.champion != champion:
        print(f"in force: {where}: {champion or '(unset)'} 100% (no rollout)", flush=True)
        return
    print(
        f"in force: {where}: {record.mode} {record.split().describe()} "
        f"(changed {record.changed_at} by {record.changed_by})",
        flush=True,
    )


def _cmd_promote(args: argparse.Namespace) -> int:
    store = _store(args)
    _print_move(store, promote(store, args.version, args.alias))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    move = rollback(store, args.alias)
    if move.before == move.after:
        log.info("rollout of %s@%s ended: %s scores every key", store.describe(), move.alias,
                 move.after)  # fmt: skip
        print(f"{store.describe()}@{move.alias}: rollout ended, {move.after} scores every key")
        _print_in_force(store, move.alias)
    else:
        _print_move(store, move)
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from stream_scorer.model.rollout import make, parse_weights, who

    store = _store(args)
    alias = args.alias
    given = [args.canary is not None, args.weights is not None, args.blue_green is not None]
    if sum(given) > 1:
        raise ConfigError("--canary", "give one of --canary, --weights, --blue-green")
    if args.percent is not None and args.canary is None:
        raise ConfigError("--percent", "goes with --canary VERSION")
    if not any(given):  # show what is in force
        _print_in_force(store, alias)
        return 0
    champion = store.get_alias(alias)
    if champion is None:
        raise ConfigError("STORE", f"{store.describe()}: alias {alias!r} is not set: promote first")
    by = f"{who()} (stream-scorer model rollout)"
    if args.canary is not None:
        if args.percent is None:
            raise ConfigError("--percent", "--canary VERSION needs --percent P")
        record = make("canary", champion, [(args.canary, args.percent)], by)
    elif args.blue_green is not None:
        record = make("blue-green", champion, [(args.blue_green, 100.0)], by)
    else:
        weights = parse_weights(args.weights)
        total = sum(p for _, p in weights)
        if abs(total - 100) > 1e-9 or len(weights) < 2:
            raise ConfigError("--weights", f"{args.weights!r}: two or more versions summing to 100")
        record = make("ab", champion, [(v, p) for v, p in weights if v != champion], by)
    start_rollout(store, record, alias)
    log.info("rollout of %s@%s set: %s", store.describe(), alias, record.to_json())
    _print_in_force(store, alias)
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
    if args.sample and args.reference_topic:
        raise ConfigError("--reference-topic", "give --sample FILE or --reference-topic, not both")
    if args.reference_topic and not args.bootstrap_servers:
        raise ConfigError("--bootstrap-servers", "is needed by --reference-topic")
    schema = load_schema(args.schema)
    records = _topic_sample(args, schema) if args.reference_topic else None
    manifest = pack(
        args.booster,
        schema,
        args.out,
        mapping=mapping,
        version=args.version,
        sample=args.sample,
        threshold=args.threshold,
        records=records,
    )
    source = args.sample or (args.reference_topic and f"topic {args.reference_topic}")
    rows = manifest.reference.get("rows", 0)
    print(
        f"model {manifest.model_version} ({manifest.objective}, {len(manifest.features)} "
        f"features{f', reference bins of {rows} rows from {source}' if source else ''}) "
        f"written to {args.out}",
        flush=True,
    )
    return 0


def _topic_sample(args: argparse.Namespace, schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The last ``--reference-count`` records of ``--reference-topic``, decoded.

    Decoded as the worker decodes schemaless input (records it would dead-letter left out).
    """
    from stream_scorer.kafka.topics import latest_values
    from stream_scorer.stages.decode import Decoder
    from stream_scorer.stages.records import Decoded, PlainMessage

    values = latest_values(args.bootstrap_servers, args.reference_topic, args.reference_count)
    decoder = Decoder(schema, max(len(v or b"") for v in values) + 1 if values else 1)
    decoded = [decoder.decode(PlainMessage(v, k=b"", o=i, ts=0)) for i, v in enumerate(values)]
    records = [d.record for d in decoded if isinstance(d, Decoded)]
    if not records:
        raise ConfigError(
            "--reference-topic", f"no record of {args.reference_topic!r} decodes with the schema"
        )
    return records


def _cmd_compare(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from stream_scorer.batch.compare import run_compare
    from stream_scorer.batch.score import load_batch_scorer
    from stream_scorer.config import load_config

    cfg = load_config(args.config)
    scorers = (load_batch_scorer(cfg, args.a), load_batch_scorer(cfg, args.b))
    report = run_compare(scorers, args.input, names=(args.a, args.b), out=args.out, top=args.top)
    print(json.dumps(asdict(report)), flush=True)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from stream_scorer.model.pack import check
    from stream_scorer.stages.decode import load_schema

    manifest = check(args.dir, load_schema(args.schema))
    rows = manifest.reference.get("rows") if manifest.reference else None
    drift = (
        f"reference bins of {rows} rows for {len(manifest.features)} features and the "
        "predictions (drift on)"
        if rows
        else "no reference bins (scored without drift; pack with --sample or --reference-topic)"
    )
    print(
        f"OK {args.dir}: model {manifest.model_version} ({manifest.objective}, "
        f"{len(manifest.features)} features) fits {args.schema}; {drift}",
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
    """Add ``model publish|promote|rollback|pack|check|compare`` to the command line."""
    model_sub = command_group(
        sub,
        "model",
        "model promote store:/srv/models/rides 7",
        help="model versions: publish, promote, rollout, rollback, pack, check, compare",
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
        help="end a rollout (100%% champion at once), else point an alias back at the version "
        "it pointed at before",
    )
    _store_arguments(back)
    back.add_argument("--alias", default=DEFAULT_ALIAS)
    back.set_defaults(func=_cmd_rollback)

    out = command(
        model_sub,
        "rollout",
        "model rollout store:/srv/models/rides@champion --canary 8 --percent 10",
        help="route a share of the keys to other versions, every worker at a batch boundary: "
        "a canary, A/B weights or blue-green (no option: show what is in force)",
    )
    _store_arguments(out)
    out.add_argument("--alias", default=DEFAULT_ALIAS, help="the champion alias (or STORE@alias)")
    out.add_argument("--canary", metavar="VERSION", help="one challenger, at --percent")
    out.add_argument(
        "--percent", type=float, help="the canary's percent of keys (0-100, steps of 0.01)"
    )
    out.add_argument(
        "--weights", metavar="V1=P1,V2=P2", help="A/B: percents over two or more versions (sum 100)"
    )
    out.add_argument(
        "--blue-green",
        metavar="VERSION",
        help="every key to VERSION, the champion kept loaded beside it (rollback switches back)",
    )
    out.set_defaults(func=_cmd_rollout)

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
    pk.add_argument(
        "--reference-topic",
        metavar="TOPIC",
        help="draw the reference sample from a topic instead: its last --reference-count "
        "records (schemaless Avro of --schema), decoded and turned into features as the "
        "worker does",
    )
    pk.add_argument(
        "--reference-count", type=int, default=10_000, help="records of --reference-topic"
    )
    pk.add_argument(
        "--bootstrap-servers", default="", help="the Kafka brokers of --reference-topic"
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

    cmp = command(
        model_sub,
        "compare",
        "model compare models/rides-v1 store:/srv/models/rides@live --config rides.yaml "
        "--input 'rides/*.parquet' --out disagree.parquet",
        help="two model versions on the same stored records: agreement, deltas, drift, and "
        "the records where they disagree most",
    )
    cmp.add_argument("a", help="model A: a directory, or any model.source (store:, models:/)")
    cmp.add_argument("b", help="model B: the same forms")
    cmp.add_argument("--config", type=Path, required=True, help="the configuration of run")
    cmp.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs"
    )
    cmp.add_argument("--out", type=Path, help="write the records they disagree most on (Parquet)")
    cmp.add_argument("--top", type=int, default=1000, help="how many of those (default 1000)")
    cmp.set_defaults(func=_cmd_compare)
