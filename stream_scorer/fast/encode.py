"""The compiled v1 prediction writer: a whole batch of predictions in one numba pass.

``write_v1_batch`` lays a batch out as arrays for ``fast.kernel.encode_v1`` and cuts its output
into one record per row. The worker hands it to ``stages.encode.PredictionEncoder``
(``batch_writer=``), which uses it for the v1 layout and proves at start-up that it writes what
the reference writer does; the stage itself never imports the fast path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

#: Bytes a v1 record takes besides its id and model version: the id's length (at most 5),
#: the double (8), the label (at most 6), two longs (at most 10 each), plus slack.
V1_FIXED_BYTES = 43


def write_v1_batch(
    ids: Sequence[str],
    predictions: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64] | None,
    version: bytes,
    event_ms: Sequence[int],
    scored_at_ms: int,
) -> list[bytes]:
    """Write a batch of v1 predictions with the compiled writer (``fast.kernel.encode_v1``).

    ``version`` is the model version already encoded as an Avro string; the result holds one
    schemaless record per row (a ``stages.encode.BatchWriter``).

    Raises:
        OverflowError: an event time or the scoring time does not fit in 64 bits.
        UnicodeEncodeError: an id holds a lone surrogate.
    """
    from stream_scorer.fast.kernel import encode_v1  # numba: imported on first use

    n = len(ids)
    raw = "".join(ids).encode()
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    if len(raw) != int(lens.sum()):  # some ids are not ASCII: count their UTF-8 bytes
        lens = np.fromiter((len(i.encode()) for i in ids), dtype=np.int64, count=n)
    times = np.array(event_ms, dtype=np.int64).reshape(n)
    if not -(2**63) <= scored_at_ms < 2**63:
        raise OverflowError(f"scored_at {scored_at_ms} does not fit in 64 bits")
    out = np.empty(len(raw) + n * (V1_FIXED_BYTES + len(version)), dtype=np.uint8)
    ends = np.empty(n, dtype=np.int64)
    used = encode_v1(
        np.frombuffer(raw or b"\x00", dtype=np.uint8),
        np.cumsum(lens),
        np.ascontiguousarray(predictions, dtype="<f8").reshape(n).view(np.uint8),
        np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64),
        labels is not None,
        np.frombuffer(version, dtype=np.uint8),
        times,
        scored_at_ms,
        out,
        ends,
    )
    data = out[:used].tobytes()
    stops = ends.tolist()
    return [data[a:b] for a, b in zip([0, *stops[:-1]], stops, strict=True)]
