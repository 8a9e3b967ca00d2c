"""Watching the models in the stream: ``evaluate`` (live outcomes, canary decisions)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_scorer import logs
from stream_scorer.cli.common import Commands, command
from stream_scorer.errors import EXIT_OK, ConfigError

if TYPE_CHECKING:
    from stream_scorer.config import Config
    from stream_scorer.evaluate.decide import Decision, Rollout

#: ``evaluate`` is listed under Models in ``stream-scorer --help``, in ``models``' row (the
#: top help fits one 24-line screen).
TITLE = "Models"
ROWS: list[tuple[tuple[str, ...], str]] = []


def rollout_of(args: argparse.Namespace, cfg: Config) -> Rollout | None:
    """The champion/challenger pair ``--decide`` judges (None without ``--decide``).

    Raises:
        ConfigError: ``--decide`` without ``evaluate.decide``, half of ``--champion`` and
            ``--challenger``, or no store to take the aliases from.
    """
    if not args.decide:
        return None
    ev = cfg.evaluate
    if ev is None or ev.decide is None:
        raise ConfigError("evaluate.decide", "--decide needs an evaluate.decide section")
    from stream_scorer.evaluate.rollout import AliasPair, FixedPair, RolloutCanary

    if (args.champion is None) != (args.challenger is None):
        raise ConfigError("--champion", "give both --champion and --challenger, or neither")
    if args.champion is not None:
        if not args.dry_run:
            raise ConfigError("--champion", "fixed versions only decide: add --dry-run")
        return FixedPair(args.champion, args.challenger)
    from stream_scorer.model.store import open_store

    spec = ev.decide.store or cfg.first.model.source
    if not spec:
        raise ConfigError("evaluate.decide.store", "name the store (or use model.source)")
    store = open_store(spec, tracking_uri=cfg.first.model.mlflow_tracking_uri)
    if ev.decide.pair == "rollout":
        return RolloutCanary(store, ev.decide.champion_alias)
    return AliasPair(store, ev.decide.champion_alias, ev.decide.challenger_alias)


def fetch_of(args: argparse.Namespace, cfg: Config) -> Callable[[str], Path] | None:
    """A version's model directory, for the prediction drift check (None: no check).

    Only with ``--decide`` and ``evaluate.decide.max_prediction_psi``, from the store the
    pair comes from (``evaluate.decide.store`` or ``model.source``'s store).

    Raises:
        ModelError: the store cannot be opened.
    """
    ev = cfg.evaluate
    if not args.decide or ev is None or ev.decide is None or ev.decide.max_prediction_psi is None:
        return None
    spec = ev.decide.store or cfg.first.model.source
    if not spec:
        return None
    from stream_scorer.model.store import MLFLOW_SCHEME, open_source

    base = spec.partition("@")[0]
    if base.startswith(MLFLOW_SCHEME):  # models:/<name>[/<version>]: the model
        base = MLFLOW_SCHEME + base[len(MLFLOW_SCHEME) :].partition("/")[0]
    source = open_source(
        f"{base}@{ev.decide.champion_alias}",
        tracking_uri=cfg.first.model.mlflow_tracking_uri,
        retry_deadline_s=cfg.retry.model_registry_timeout_s,
        policy=cfg.retry.policy(),
    )
    return source.fetch


def _print_decision(decision: Decision, applied: bool) -> None:
    from stream_scorer.evaluate.runner import decision_dict

    sys.stdout.write(json.dumps(decision_dict(decision, applied)) + "\n")
    sys.stdout.flush()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from stream_scorer.worker.flow import StopFlag

    stop = StopFlag()
    with stop.on_signals():
        return _evaluate(args, stop)


def _evaluate(args: argparse.Namespace, stop: Any) -> int:
    from stream_scorer.config import load_config
    from stream_scorer.evaluate.runner import Evaluator, serve_metrics
    from stream_scorer.worker.health import tls_context

    overrides: dict[str, Any] = {}
    if args.bootstrap_servers is not None:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap_servers}
    cfg = load_config(args.config, overrides=overrides)
    logs.setup(cfg.logging.format, args.log_level or cfg.logging.level)
    if cfg.evaluate is None:
        raise ConfigError("evaluate", "stream-scorer evaluate needs an evaluate: section")
    evaluator = Evaluator(
        cfg,
        rollout=rollout_of(args, cfg),
        apply=args.decide and not args.dry_run,
        on_decision=_print_decision,
        fetch=fetch_of(args, cfg),
    )
    port = cfg.evaluate.metrics_port if args.metrics_port is None else args.metrics_port
    serve_metrics(evaluator.metrics, cfg.metrics.host, port, tls_context(cfg))
    report = evaluator.run(lambda: bool(stop))
    sys.stdout.write(json.dumps({"windows": report.windows, "pairs": report.pairs}) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def add_commands(sub: Commands) -> None:
    """Add ``evaluate``."""
    ev = command(
        sub,
        "evaluate",
        "evaluate --config rides.yaml --decide --dry-run",
        help="join predictions with their outcomes: live metrics per model version",
    )
    ev.add_argument("--config", type=Path, required=True, help="configuration with evaluate:")
    ev.add_argument(
        "--decide", action="store_true", help="apply evaluate.decide to the champion/challenger"
    )
    ev.add_argument(
        "--dry-run", action="store_true", help="with --decide: print decisions, act on none"
    )
    ev.add_argument("--champion", help="with --dry-run: the champion's version (no store)")
    ev.add_argument("--challenger", help="with --dry-run: the challenger's version")
    ev.add_argument("--metrics-port", type=int, help="override evaluate.metrics_port (0: none)")
    ev.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    ev.set_defaults(func=_cmd_evaluate)
