"""The one error hierarchy of calicnm.

Every adapter (etcd, netlink, subprocess) translates its library's failures
into these classes with ``raise ... from exc``; every boundary (the HTTP
layer, the CLI, the node) turns them into its own wire form: a non-200
``{"Err": message}`` for Docker, a one-line message and a non-zero exit
status for the CLI.

    CalicnmError                   500  anything calicnm raises on purpose
    ├── InvalidRequest             400  malformed or impossible input
    │   └── Unsupported            400  valid, but this host or version cannot do it
    ├── NotFound                   404  an id or key that does not exist
    ├── Conflict                   409  the request clashes with existing state
    │   ├── AddressInUse
    │   ├── PoolExhausted
    │   └── DatastoreConflict          compare-and-swap retries ran out
    ├── DatastoreUnavailable       503  etcd cannot be reached
    ├── LeaseLost                  503  etcd no longer holds a lease (expired, revoked)
    ├── ForeignDatastore           503  etcd is not the datastore this host served
    └── DataplaneError             500  the kernel refused a change
"""

from __future__ import annotations


class CalicnmError(Exception):
    """Base class; ``status`` is the HTTP status the plugin answers with."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidRequest(CalicnmError):
    status = 400


class Unsupported(InvalidRequest):
    pass


class NotFound(CalicnmError):
    status = 404


class Conflict(CalicnmError):
    status = 409


class AddressInUse(Conflict):
    pass


class PoolExhausted(Conflict):
    pass


class DatastoreConflict(Conflict):
    pass


class DatastoreUnavailable(CalicnmError):
    status = 503


class LeaseLost(CalicnmError):
    """etcd does not know the lease a call named: it expired (its keys are
    gone) or was revoked.  The holder grants a new one."""

    status = 503


class ForeignDatastore(CalicnmError):
    status = 503


class DataplaneError(CalicnmError):
    status = 500
