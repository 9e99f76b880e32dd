"""Accounting: what a call cost (cost.py), how it ends (call_end.py: limits released, metrics,
ledger row, log line, exactly once), and the ledger writer that puts rows in the database off
the hot path (ledger.py)."""
