"""Operator commands: lag, rewind, dead-letter replay, ACL grants (``stream-scorer ...``).

They build on the runtime (``kafka``: admin calls, access checks); the runtime never imports
them (the import-linter contracts in pyproject.toml).
"""
