"""The runtime's Kafka plumbing, shared by the worker and the operator commands.

``topics``: admin calls (topics required or created, their ``max.message.bytes``, groups'
committed offsets and members) and the topic-partition type ``TP``. ``access``: the rights each
role needs, the start-up access check and the words for a broker's refusal.
"""
