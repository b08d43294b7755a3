"""Mutual TLS between the gateway and pilot jobs: certificates and SSL contexts.

A leaf package: the pilot (on a compute node), the adaptors and the server all use it, so it
imports none of them.
"""
