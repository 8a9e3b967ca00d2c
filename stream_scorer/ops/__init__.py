"""Operator commands on a deployment's topics and groups: lag, dead-letter replay, topics."""
