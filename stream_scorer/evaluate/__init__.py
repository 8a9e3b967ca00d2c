"""``stream-scorer evaluate``: live outcomes joined with predictions, and canary decisions.

``stats`` (the metrics of a window, as counts), ``join`` (the bounded join state), ``decide``
(the canary rule, pure), ``rollout`` (where decisions are carried out), ``metrics`` (Prometheus)
and ``runner`` (the Kafka loop). docs/manual/watching.md.
"""
