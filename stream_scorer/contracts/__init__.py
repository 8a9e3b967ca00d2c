"""The product's output contract, shipped inside the package: the prediction schema.

``schemas/`` at the repository's top holds the same files for producers and consumers to read
(a test keeps them byte-identical).
"""

from __future__ import annotations

from pathlib import Path

from stream_scorer.resources import packaged_file

#: The v1 prediction schema every worker writes by default.
PREDICTION_SCHEMA_V1: Path = packaged_file(__name__, "prediction.v1.avsc")
#: The v1 evaluation record ``stream-scorer evaluate`` writes (one per window per version).
EVALUATION_SCHEMA_V1: Path = packaged_file(__name__, "evaluation.v1.avsc")
