"""flashwatch's one error hierarchy.

It lives in the bottom-most package (``model``) because every other package depends on it.
Each class says whether the condition is recoverable: a recoverable error is caught at a
stage boundary, recorded in status and retried or answered; a fatal one stops the component.

    FlashwatchError
    ├── ConfigError                 fatal at start: bad YAML, unknown key, bad --set / --source
    ├── ModelError
    │   ├── CheckpointError         fatal: missing/unexpected keys, wrong shapes, unreadable files
    │   ├── UnsupportedConfigError  fatal: a checkpoint setting we do not implement
    │   ├── PromptTooLongError      recoverable (per query): prompt longer than the context
    │   ├── KVCapacityError         recoverable (per query): a sequence outgrew its KV slot
    │   └── KVPoolExhausted         recoverable: every KV slot is taken; retry when one frees
    ├── SourceError
    │   ├── SourceUnavailable       recoverable: reconnect with backoff (refused, timeout, EOF)
    │   └── SourceFatal             fatal for that stream: retrying cannot help (401, no video)
    ├── MemoryStoreError
    │   └── SnapshotError           recoverable: snapshot corrupt or mismatched, moved aside
    ├── BusError                    recoverable: Redis unreachable, reconnect with backoff
    │   ├── BusAccessDenied         fatal at start: wrong/missing password, ACL lacks a permission
    │   └── DaemonConflict          fatal at start: another daemon owns this Redis and prefix
    └── QueryError                  recoverable: fails one query, carries an error ``code``
        ├── InvalidRequest          code "invalid_request"
        ├── UnknownStream           code "unknown_stream"
        ├── EmptyMemory             code "empty_memory"
        ├── Busy                    code "busy"
        ├── QueryTimeout            code "timeout"
        ├── QueryCancelled          code "cancelled"
        └── NotReady                code "not_ready" (HTTP API: still starting, or stopping)
"""

from __future__ import annotations


class FlashwatchError(Exception):
    """Root of every error flashwatch raises on purpose."""

    recoverable: bool = False


class ConfigError(FlashwatchError):
    """The configuration (YAML, overrides) is invalid. Fatal at start."""


class ModelError(FlashwatchError):
    """Something about the model or its use is wrong."""


class CheckpointError(ModelError):
    """A checkpoint cannot be loaded: files, key names or shapes. Fatal."""


class UnsupportedConfigError(ModelError):
    """A checkpoint asks for something this implementation does not do. Fatal."""


class PromptTooLongError(ModelError):
    """The prompt does not fit the context. Fails that query only."""

    recoverable = True


class KVCapacityError(ModelError):
    """A sequence needs more KV rows at some layer than its pooled slot holds. Fails that
    query only."""

    recoverable = True


class KVPoolExhausted(ModelError):
    """Every slot of the KV pool is in use; admit the sequence once another one finishes."""

    recoverable = True


class SourceError(FlashwatchError):
    """A video source failed."""


class SourceUnavailable(SourceError):
    """The source is unreachable or dropped out; reconnecting may help."""

    recoverable = True


class SourceFatal(SourceError):
    """The source can never work as configured (no video track, codec, 401)."""


class MemoryStoreError(FlashwatchError):
    """The token memory refused an operation."""


class SnapshotError(MemoryStoreError):
    """A snapshot on disk is corrupt, truncated or from another model."""

    recoverable = True


class BusError(FlashwatchError):
    """The message bus (Redis) is unreachable or misbehaving; reconnect with backoff."""

    recoverable = True


class BusAccessDenied(BusError):
    """Redis answers but refuses us: authentication failed or the ACL user lacks a permission.

    Fatal at start (retrying with the same credentials cannot help); while running it is a
    state shown in status, and the daemon keeps retrying in case the credentials come back.
    """

    recoverable = False


class DaemonConflict(BusError):
    """Another running daemon owns this Redis and key prefix (or the demo's private Redis).

    Fatal: two daemons on one consumer group would split questions between two memories.
    """

    recoverable = False


class QueryError(FlashwatchError):
    """A query failed; ``code`` is the error code sent to the client."""

    recoverable = True
    code: str = "internal"


class InvalidRequest(QueryError):
    code = "invalid_request"


class UnknownStream(QueryError):
    code = "unknown_stream"


class EmptyMemory(QueryError):
    code = "empty_memory"


class Busy(QueryError):
    code = "busy"


class QueryTimeout(QueryError):
    code = "timeout"


class QueryCancelled(QueryError):
    code = "cancelled"


class NotReady(QueryError):
    """The daemon cannot take queries yet (model loading) or any more (stopping)."""

    code = "not_ready"
