"""The audit trail: one hash-chained, append-only record per decision and model change.

`AuditLog` (log.py) writes records on one thread; `python -m xaid_server.audit` verifies a log
and replays a record.
"""
