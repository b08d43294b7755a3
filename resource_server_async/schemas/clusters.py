"""`resource_server_async.schemas.clusters`: `JobsByStatus` is this gateway's `Jobs`."""

from adaptors.cluster import JobInfo, Jobs

JobsByStatus = Jobs

__all__ = ["JobInfo", "Jobs", "JobsByStatus"]
