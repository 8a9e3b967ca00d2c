"""The compiled fast path: decode and features of a whole batch in one numba-compiled pass.

``plan`` compiles a schema and a feature list into a program, ``kernel`` interprets it, ``path``
runs batches through it with the same guards and reason codes as the stages; ``encode`` is the
compiled v1 prediction writer the worker hands to ``stages.encode.PredictionEncoder``.
"""
