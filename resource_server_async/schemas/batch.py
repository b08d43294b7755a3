"""`resource_server_async.schemas.batch`: the batch states."""

from adaptors.endpoint import BatchStatusEnum

BatchStatus = BatchStatusEnum

__all__ = ["BatchStatus"]
