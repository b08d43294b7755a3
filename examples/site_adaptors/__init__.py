"""A site's own adaptor package, as described in docs/adaptors.md."""
