"""Background agent runs as records: the run store (SQLite by default)."""
