"""The worker runtime around the stages: consume, deliver, commit, and report on it.

The main loop (``loop``), the consumer (``source``) and producer (``sink``) sides, the delivery
modes and offset tracking, flow control, lag, health, metrics and the multi-process supervisor.
"""
