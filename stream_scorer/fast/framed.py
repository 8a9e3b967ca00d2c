"""Framed input's per-writer-schema choice: the compiled fast path when it can, else fastavro.

``build_framed_columns`` gives ``stages.framing.FramedColumns`` the factory that builds each
writer schema's decode + features: a ``FastColumns`` for writer schemas the resolution reads
fast (``Kind.FAST``) and the program can specialise, the guarded fastavro path otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.fast.path import FastColumns
from stream_scorer.fast.plan import Unsupported
from stream_scorer.stages.columns import AvroColumns
from stream_scorer.stages.decode import Decoder
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.framing import FramedColumns
from stream_scorer.stages.records import Columns, Message
from stream_scorer.stages.resolution import Kind

log = logging.getLogger(__name__)


def build_framed_columns(
    reader: dict[str, Any],
    features: Sequence[FeatureSpec],
    *,
    id_field: str,
    event_time_field: str,
    max_message_bytes: int,
    fast_path: bool = True,
    max_schemas: int = 1000,
) -> FramedColumns:
    """``FramedColumns`` whose writer schemas get the fast path when they can, else fastavro.

    Args:
        reader: the parsed reader schema (``input.schema``).
        features: the model's features, in column order.
        id_field: the input field copied into ``input_id``.
        event_time_field: the input field with the event time; empty: none.
        max_message_bytes: larger values are dead-lettered (``too_large``) unread.
        fast_path: false: every writer schema is read by the guarded fastavro path.
        max_schemas: writer schemas (and plans) kept.
    """
    paths = [f.field for f in features] + [id_field]
    if event_time_field:
        paths.append(event_time_field)

    def factory(
        writer: dict[str, Any], kind: Kind, skip: int
    ) -> tuple[Callable[[Sequence[Message]], Columns], str]:
        if kind is Kind.FAST and fast_path:
            try:
                fast = FastColumns(
                    writer,
                    features,
                    id_field=id_field,
                    event_time_field=event_time_field,
                    max_message_bytes=max_message_bytes,
                )
            except Unsupported as exc:
                log.info("writer schema %s: fastavro path (%s)", writer.get("name"), exc)
            else:
                return (lambda messages: fast.run(messages, skip, hints=False)), "fast"
        slow = AvroColumns(
            Decoder(writer, max_message_bytes, reader=reader, skip=skip, hints=False),
            FeatureBuilder(features),
            id_field=id_field,
            event_time_field=event_time_field,
        )
        return slow.run, "fastavro"

    return FramedColumns(
        reader,
        paths,
        factory,
        len(features),
        max_message_bytes=max_message_bytes,
        max_schemas=max_schemas,
    )
