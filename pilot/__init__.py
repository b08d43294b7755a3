"""The pilot: started by a batch job on a compute node, it runs model servers and serves them to
the gateway behind one mutual-TLS port (docs/on-demand.md). It imports nothing of the gateway
but `mtls`, so that a site installs the same package on its clusters."""
