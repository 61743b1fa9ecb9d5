"""What the harness reports: metrics, per-query scores and paired tests, tables and figures."""
