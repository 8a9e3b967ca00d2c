"""Scoring stored records with the stream's pipeline: ``score``, ``model compare``, Spark.

``files``: the readers and writers (Parquet, Avro container files; atomic output), ``score``:
the batch scorer and the command, ``compare``: two models on the same records, ``spark``: the
function PySpark's ``mapInArrow`` runs on each executor.
"""
