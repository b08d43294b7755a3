"""Scheduler adaptors: how the gateway submits, watches, ends and stages files for the pilot jobs
that serve on-demand deployments (docs/on-demand.md). Plug-ins by dotted path, like endpoints."""
