"""The on-demand controller (docs/on-demand.md, "Deployments and the controller"): starts pilot
jobs for declared deployments, follows them through the scheduler, the pilots' registrations and
heartbeats, and keeps each process's routing map of ready replicas.

`controller` is what adaptors and the app see; `routing` the per-process map the request path
reads; `progress` the phase and ETA users are told; `reconcile` the leader's loop; `replicas`
starting and ending one pilot job; `pilots` what a pilot's registration and heartbeats change;
`broadcast` the Redis channel that tells other hosts to refresh at once.
"""
