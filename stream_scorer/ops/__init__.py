"""Operator commands that work on a running deployment's topics: dead-letter replay, topics."""
