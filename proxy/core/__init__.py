"""The request core: who is calling and what they may use (identity, Globus Auth, authorization),
what they name (registry, lookup, federation), what they may spend (limits, usage), what they send
(schemas), and the request's exchange with its adaptor (dispatch, streaming, the callback relay)."""
