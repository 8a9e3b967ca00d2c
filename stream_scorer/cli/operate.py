"""Operating a deployment: ``topics create``, ``acl grant``, ``lag``, ``rewind``, ``dlq replay``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from stream_scorer.cli.common import Commands, command, command_group, group_tool_options
from stream_scorer.errors import ConfigError
from stream_scorer.stages.records import Reason

if TYPE_CHECKING:
    from stream_scorer.config import Config

#: The heading of these commands in ``stream-scorer --help``, and its rows (commands, summary).
TITLE = "Operate"
ROWS = [
    (("topics", "acl"), "create the topics; grant least-privilege ACLs"),
    (("lag", "rewind"), "a group's lag; move a stopped group back in time"),
    (("dlq",), "replay dead letters (by reason, time range)"),
]


def _group_target(args: argparse.Namespace) -> tuple[dict[str, str], str, Config | None]:
    """``lag``'s and ``rewind``'s connection, group and configuration (``--config``, or None).

    ``--bootstrap-servers`` and ``--group`` win over the configuration's.

    Raises:
        ConfigError: no brokers or no group from either.
    """
    settings: dict[str, str] = {}
    group, cfg = args.group, None
    if args.config is not None:
        from stream_scorer.config import client_settings, load_config

        cfg = load_config(args.config)
        settings = client_settings(cfg)
        group = group or cfg.input.group_id
    if args.bootstrap_servers:
        settings["bootstrap.servers"] = args.bootstrap_servers
    if not settings.get("bootstrap.servers"):
        raise ConfigError("kafka.bootstrap_servers", "give --bootstrap-servers or --config")
    if not group:
        raise ConfigError("input.group_id", "give --group or --config")
    return settings, group, cfg


def _cmd_lag(args: argparse.Namespace) -> int:
    from stream_scorer.kafka.groups import describe_group
    from stream_scorer.ops.lag import to_json, to_table

    settings, group, cfg = _group_target(args)
    topic = args.topic or (cfg.input.topic if cfg is not None else None)
    if args.share or (cfg is not None and cfg.input.group_type == "share"):
        from stream_scorer.devtools.localkafka import fetch_jars, find_java
        from stream_scorer.ops import sharelag

        # the broker's own tool, from the jars local-kafka fetches (the Python admin client has
        # no share-group calls yet)
        jars = fetch_jars(log=lambda _: None)
        found = sharelag.describe_share_group(settings, group, topic, java=find_java(), libs=jars)
        print(sharelag.to_json(group, found) if args.json else sharelag.to_table(group, found))
        return 0
    rows = describe_group(settings, group, topic, timeout=args.timeout)
    print(to_json(group, rows) if args.json else to_table(group, rows), flush=True)
    return 0


def _cmd_rewind(args: argparse.Namespace) -> int:
    import time

    from stream_scorer.ops.rewind import parse_duration, rewind, to_json, to_table

    settings, group, cfg = _group_target(args)
    topics = list(args.topic or ())
    if cfg is not None:
        topics = topics or [cfg.input.topic]
    if args.by is not None:
        to_ms = int((time.time() - parse_duration(args.by)) * 1000)
    else:
        to_ms = _time_ms("--to", args.to) or 0
    report = rewind(settings, group, to_ms, topics, dry_run=args.dry_run, timeout=args.timeout)
    print(to_json(report) if args.json else to_table(report), flush=True)
    return 0


def _cmd_topics_create(args: argparse.Namespace) -> int:
    from stream_scorer.config import kafka_client, load_config
    from stream_scorer.kafka.topics import ensure_topics

    cfg = load_config(args.config)
    for name, value in (
        ("--partitions", args.partitions),
        ("--output-partitions", args.output_partitions),
        ("--dead-letter-partitions", args.dead_letter_partitions),
        ("--replication-factor", args.replication_factor),
    ):
        if value is not None and value < 1:
            raise ConfigError(name, f"must be at least 1, got {value}")
    topics = {
        cfg.input.topic: args.partitions,
        **{e.output.topic: args.output_partitions or args.partitions for e in cfg.entries},
        cfg.dead_letter.topic: args.dead_letter_partitions,
    }
    bootstrap = args.bootstrap_servers or cfg.kafka.bootstrap_servers
    created = ensure_topics(
        bootstrap,
        topics,
        replication_factor=args.replication_factor,
        client=kafka_client(cfg.kafka),
    )
    for name, partitions in topics.items():
        state = "created" if name in created else "already there"
        print(f"{name}: {state}, {partitions} partitions (at {bootstrap})")
    return 0


def _cmd_acl_grant(args: argparse.Namespace) -> int:
    """Grant a principal exactly what a role needs for the deployment of ``--config``."""
    from pydantic import ValidationError

    from stream_scorer.config import KafkaConfig, client_settings, load_config, read_file
    from stream_scorer.kafka.access import role_grants
    from stream_scorer.ops.grant import grant

    cfg = load_config(args.config)
    grants = role_grants(cfg, args.role)
    for g in grants:
        print(f"ALLOW {args.principal} {g.describe()}")
    if args.dry_run:
        return 0
    settings = client_settings(cfg)
    if args.admin_config is not None:
        table = read_file(args.admin_config).get("kafka")
        if not isinstance(table, dict):
            raise ConfigError("--admin-config", f"{args.admin_config} has no kafka table")
        try:
            kafka = KafkaConfig.model_validate(
                table, context={"base": args.admin_config.resolve().parent}
            )
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError("--admin-config", f"{args.admin_config}: kafka.{where}") from exc
        settings = client_settings(cfg.model_copy(update={"kafka": kafka}))
    grant(settings, grants, args.principal)
    print(f"granted {len(grants)} rights to {args.principal} ({args.role})", flush=True)
    return 0


def _time_ms(name: str, text: str | None) -> int | None:
    """Milliseconds since the epoch from an ISO 8601 time (UTC unless it says) or a number."""
    from datetime import UTC, datetime

    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(name, f"not an ISO 8601 time or epoch milliseconds: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    from stream_scorer.config import kafka_client, load_config
    from stream_scorer.ops.replay import ReplayFilter, replay

    bootstrap, dlq, target, client = args.bootstrap_servers, args.dead_letter_topic, args.to, {}
    signing_key = args.signing_key
    if args.config is not None:
        cfg = load_config(args.config)
        bootstrap = bootstrap or cfg.kafka.bootstrap_servers
        dlq = dlq or cfg.dead_letter.topic
        target = target or cfg.input.topic
        client = kafka_client(cfg.kafka)
        signing_key = signing_key or cfg.dead_letter.signing_key
    for name, value in (
        ("--bootstrap-servers", bootstrap),
        ("--dead-letter-topic", dlq),
        ("--to", target),
    ):
        if not value:
            raise ConfigError(name, "is required (or give --config)")
    flt = ReplayFilter(
        frozenset(args.reason or ()),
        _time_ms("--since", args.since),
        _time_ms("--until", args.until),
    )
    report = replay(
        bootstrap,
        dlq,
        target,
        flt,
        rate=args.rate,
        group=args.group,
        client=client,
        private_key=args.private_key,
        signing_key=signing_key,
    )
    print(json.dumps(asdict(report)), flush=True)
    return 1 if report.refused else 0


def add_commands(sub: Commands) -> None:
    """Add ``topics create``, ``acl grant``, ``lag``, ``rewind`` and ``dlq replay``."""
    topics_sub = command_group(
        sub,
        "topics",
        "topics create --config rides.yaml --partitions 12",
        help="the deployment's topics",
    )
    create = command(
        topics_sub,
        "create",
        "topics create --config rides.yaml --partitions 12",
        help="create a configuration's input, output and dead-letter topics (idempotent)",
        description="Create input.topic, output.topic and dead_letter.topic of a worker "
        "configuration unless they exist (an existing topic must have the asked partitions). "
        "The input's partition count bounds how many workers of the group are useful.",
    )
    create.add_argument("--config", type=Path, required=True, help="a worker configuration")
    create.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    create.add_argument("--partitions", type=int, default=6, help="input topic (default 6)")
    create.add_argument("--output-partitions", type=int, help="default: --partitions")
    create.add_argument("--dead-letter-partitions", type=int, default=1, help="default 1")
    create.add_argument("--replication-factor", type=int, default=1, help="default 1")
    create.set_defaults(func=_cmd_topics_create)
    acl_sub = command_group(
        sub,
        "acl",
        "acl grant --config rides.yaml --principal User:worker --role worker",
        help="least-privilege ACLs for the worker and the tools",
    )
    ag = command(
        acl_sub,
        "grant",
        "acl grant --config rides.yaml --principal User:worker --role worker",
        help="grant a principal exactly what a role needs (the manual, Security)",
        description="Create the ALLOW ACLs a role needs for the deployment a configuration "
        "describes: worker (in its delivery mode), lag, or replay. Idempotent.",
    )
    ag.add_argument("--config", type=Path, required=True, help="the worker configuration")
    ag.add_argument("--principal", required=True, help="User:<name>")
    ag.add_argument("--role", required=True, choices=["worker", "lag", "replay"])
    ag.add_argument(
        "--admin-config",
        type=Path,
        help="a file whose kafka table connects as a user allowed to alter ACLs "
        "(default: --config's own connection)",
    )
    ag.add_argument("--dry-run", action="store_true", help="print the ACLs, change nothing")
    ag.set_defaults(func=_cmd_acl_grant)
    lag = command(
        sub,
        "lag",
        "lag --config rides.yaml --json",
        help="a consumer group's lag in records and seconds",
    )
    lag.add_argument("--group", help="consumer group (default with --config: input.group_id)")
    lag.add_argument("--topic", help="only this topic (default with --config: input.topic)")
    lag.add_argument(
        "--share",
        action="store_true",
        help="a share group (default with --config: input.group_type); runs the broker's "
        "ShareGroupCommand with the local Java",
    )
    group_tool_options(lag)
    lag.set_defaults(func=_cmd_lag)

    rw = command(
        sub,
        "rewind",
        "rewind --config rides.yaml --by 2h --dry-run",
        help="move a stopped group's committed offsets back to a time (re-score a window)",
        description="Move the group's committed offsets to the first record at or after the "
        "time (a time after the last record: the end offset). Refused while the group has "
        "members: stop its workers first. Prints each partition's offsets before and after.",
    )
    rw.add_argument("--group", help="consumer group (default with --config: input.group_id)")
    when = rw.add_mutually_exclusive_group(required=True)
    when.add_argument("--to", help="the time: ISO 8601 (UTC unless it says) or epoch ms")
    when.add_argument("--by", help="this long before now: 90s, 15m, 2h, 1h30m, 1d")
    rw.add_argument(
        "--topic",
        action="append",
        help="only this topic (repeatable; default with --config: input.topic, else every "
        "topic the group committed offsets for)",
    )
    rw.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    group_tool_options(rw)
    rw.set_defaults(func=_cmd_rewind)
    dlq_sub = command_group(
        sub,
        "dlq",
        "dlq replay --config rides.yaml --reason schema_mismatch",
        help="dead-letter tools",
    )
    rp = command(
        dlq_sub,
        "replay",
        "dlq replay --config rides.yaml --reason schema_mismatch",
        help="publish dead letters again (all, or by reason or time range), once",
        description="Re-publish dead letters with their original key, value and headers. "
        "Safe to run twice: progress commits with the records in one transaction.",
    )
    rp.add_argument("--config", type=Path, help="worker configuration (topics, connection)")
    rp.add_argument("--bootstrap-servers", help="default: the config's kafka.bootstrap_servers")
    rp.add_argument("--dead-letter-topic", help="default: the config's dead_letter.topic")
    rp.add_argument("--to", help="target topic (default: the config's input.topic)")
    rp.add_argument(
        "--reason",
        action="append",
        choices=[r.value for r in Reason],
        metavar="REASON",
        help="replay only this dead-letter reason code (repeatable; the manual's Dead letters)",
    )
    rp.add_argument("--since", help="dead-lettered at or after (ISO 8601 or epoch ms)")
    rp.add_argument("--until", help="dead-lettered before (ISO 8601 or epoch ms)")
    rp.add_argument("--rate", type=float, help="records per second (default: unlimited)")
    rp.add_argument("--group", help="progress group (default: derived from topics and filter)")
    rp.add_argument(
        "--private-key",
        type=Path,
        help="PEM RSA private key that opens encrypted dead letters (dead_letter.payload)",
    )
    rp.add_argument(
        "--signing-key",
        type=Path,
        help="replay only dead letters signed with this key (default: the config's "
        "dead_letter.signing_key); unsigned or altered ones are refused",
    )
    rp.set_defaults(func=_cmd_dlq_replay)
