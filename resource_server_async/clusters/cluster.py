"""`resource_server_async.clusters.cluster`: the cluster contract of either version of the
existing gateway. `get_jobs(self)` or `get_jobs(self, auth)`, returning `GetJobsResponse` or the
jobs themselves (`JobsByStatus`), raising `GetJobsError`: the gateway calls and reads each."""

from adaptors.cluster import BaseCluster, GetJobsResponse, JobInfo, Jobs
from resource_server_async.schemas.clusters import JobsByStatus

__all__ = ["BaseCluster", "GetJobsResponse", "JobInfo", "Jobs", "JobsByStatus"]
