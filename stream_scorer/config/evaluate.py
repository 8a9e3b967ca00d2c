"""The ``evaluate:`` section: ``stream-scorer evaluate``, live outcomes joined with predictions.

See docs/manual/watching.md ("Live outcomes", "Canary decisions"). The evaluator reads the
worker's own prediction topic (``output.topic``, its ``output.format`` and ``output.schema``)
unless ``prediction_topics`` names others, and the connection, registry and logging sections of
the same file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from stream_scorer.config.values import (
    ExistingFile,
    Int,
    NonEmpty,
    Number,
    Section,
    none_words,
)
from stream_scorer.errors import ConfigError


class OutcomesConfig(Section):
    """The outcomes topic: the true label or value of each event, keyed by its id."""

    topic: NonEmpty
    """Topic of the outcomes, keyed by the event id (the same key, partition count and
    partitioner as the prediction topic: docs/manual/watching.md, "Scaling")."""
    format: Literal["schemaless", "confluent", "json"] = "schemaless"
    """``schemaless``: bare Avro bodies written with ``schema``; ``confluent``: the Confluent
    wire format, each record read with its writer schema from the registry (needs
    ``registry.url``); ``json``: one JSON object per record (UTF-8)."""
    schema_file: Annotated[ExistingFile | None, BeforeValidator(none_words)] = Field(
        default=None, alias="schema"
    )
    """Path of the outcomes' Avro schema (``.avsc``); required unless ``format: json``."""
    id_field: NonEmpty = "input_id"
    """Field holding the event id (the prediction's ``input_id``)."""
    value_field: NonEmpty = "outcome"
    """Field holding the true value: 0 or 1 (or false/true) for a classifier, a number for a
    regression."""
    time_field: str = ""
    """Field holding the outcome's time (epoch milliseconds); empty: the Kafka record's
    timestamp."""


class DecideConfig(Section):
    """The canary rule ``evaluate --decide`` applies (docs/manual/watching.md)."""

    metric: Literal["log_loss", "brier", "auc", "precision", "recall", "mae", "rmse"]
    """The live metric compared (lower is better for log loss, Brier, MAE and RMSE)."""
    min_outcomes: Int = Field(default=1000, ge=1)
    """Never decide on fewer outcomes than this, for either version."""
    promote_margin: Number = 0.0
    """Promote when the challenger is worse than the champion by at most this (in the metric's
    units; negative: it must be better by at least as much)."""
    rollback_margin: Number = Field(default=0.02, ge=0)
    """Roll back at once when the challenger is worse by more than this."""
    max_prediction_psi: Annotated[Number | None, BeforeValidator(none_words)] = Field(
        default=None, gt=0
    )
    """Roll back at once when the challenger's prediction PSI (against the prediction
    reference packed with its version, ``model pack --sample``) exceeds the PSI expected of the
    window's predictions under no drift by more than this. Needs no outcomes, but at least
    ``min_outcomes`` predictions of the challenger in the window; a version packed without a
    reference is not checked. none: off."""
    store: str = ""
    """The alias store holding the pair (``store:<root>/<name>`` or ``models:/<name>``);
    empty: ``model.source``'s store."""
    pair: Literal["rollout", "aliases"] = "rollout"
    """What the rule judges and acts on: ``rollout``, the rollout record of
    ``champion_alias`` (``model rollout --canary``: promote moves the alias to the challenger
    and ends the rollout, rollback ends it); ``aliases``, a champion and a challenger alias
    (promote points the champion alias at the challenger's version, rollback the challenger
    alias at the champion's)."""
    champion_alias: NonEmpty = "champion"
    """The alias of the champion (``pair: rollout``: the alias the workers follow)."""
    challenger_alias: NonEmpty = "challenger"
    """``pair: aliases``: the alias of the challenger (a rollback points it back at the
    champion's version)."""

    @model_validator(mode="after")
    def _margins(self) -> DecideConfig:
        if self.rollback_margin < self.promote_margin:
            raise ConfigError(
                "evaluate.decide.rollback_margin", "must be at least evaluate.decide.promote_margin"
            )
        return self


class EvaluateConfig(Section):
    """``stream-scorer evaluate``: predictions joined with the outcomes that arrive later."""

    group_id: str = ""
    """Consumer group of the evaluators (default: ``<input.group_id>-evaluate``)."""
    prediction_topics: tuple[NonEmpty, ...] = ()
    """The prediction topics read (default: ``output.topic``), all written with
    ``output.format`` and ``output.schema``."""
    outcomes: OutcomesConfig
    """The outcomes topic and its format."""
    topic: NonEmpty
    """The evaluation topic: one record per window per model version
    (``evaluation.v1.avsc``, schemaless Avro)."""
    model_name: NonEmpty = "model"
    """The ``model`` label of the exported metrics."""
    horizon_s: Number = Field(default=7 * 86400.0, gt=0)
    """How long after a prediction's event time its outcome may arrive (and how far back a
    restart reads both topics)."""
    window_events: Int = Field(default=10_000, ge=0)
    """A window closes after this many joined outcomes (all versions together; 0: no limit)."""
    window_s: Number = Field(default=300.0, ge=0)
    """A window closes after this many seconds (0: no limit)."""
    bins: Int = Field(default=100, ge=10, le=10_000)
    """Bins of the histogram AUC (its error is at most ``auc_error_bound``, in the record)."""
    max_pending: Int = Field(default=250_000, ge=1)
    """Predictions (and, apart, outcomes) waiting in the join; beyond it the oldest is dropped
    (``stream_scorer_evaluation_dropped_total``)."""
    max_versions: Int = Field(default=8, ge=1)
    """Model versions exported to Prometheus at once; the least recently seen one's series
    are removed when another comes."""
    metrics_port: Int = Field(default=9401, ge=0, le=65535)
    """HTTP port of the evaluator's ``/metrics`` (on ``metrics.host``); 0 disables it."""
    require_copartitioned: bool = True
    """Stop at start (exit 2) when the prediction and outcome topics' partition counts differ;
    false: warn and go on (correct with one evaluator only)."""
    decide: Annotated[DecideConfig | None, BeforeValidator(none_words)] = None
    """The canary rule of ``evaluate --decide`` (none: no decisions)."""

    @model_validator(mode="after")
    def _checks(self) -> EvaluateConfig:
        if self.window_events == 0 and self.window_s == 0:
            raise ConfigError("evaluate.window_events", "give window_events or window_s (> 0)")
        if self.outcomes.format != "json" and self.outcomes.schema_file is None:
            raise ConfigError(
                "evaluate.outcomes.schema", f"is required with format {self.outcomes.format}"
            )
        return self
