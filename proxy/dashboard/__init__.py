"""The usage dashboard: who used what, on which cluster, behind an administrators' login
(docs/dashboard.md). Beside the edge in the layers: HTTP-facing, reading the records."""
