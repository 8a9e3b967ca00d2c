"""Operator commands on a running deployment's topics and groups: lag, dead-letter replay, topics."""
