"""`resource_server_async.clusters.*` of the existing gateway."""
