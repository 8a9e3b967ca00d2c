"""The pure batch stages, no Kafka: decode → features → score → encode, and their pipeline.

Bad records leave each stage as values (``DeadLetter``), never as exceptions.
"""
