"""`resource_server_async.endpoints.*` of the existing gateway."""
