"""Metrics: what operators graph and alert on (Prometheus), and the cheap counters behind them.
Every layer above may report to it; it imports only the leaves (settings, errors)."""
