"""`resource_server_async.schemas.*` of the existing gateway: its current response models."""
