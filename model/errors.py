"""flashwatch's one error hierarchy: the root and the model's errors live here, in the
bottom-most package; every other package keeps the errors it raises in its own ``errors``
module, under this root. Each class says whether the condition is recoverable: a recoverable
error is caught at a stage boundary, recorded in status and retried or answered; a fatal one
stops the component.

    FlashwatchError                          model.errors
    ├── ConfigError                 fatal at start: bad YAML, unknown key, bad --set / --source
    ├── ModelError                           model.errors
    │   ├── CheckpointError         fatal: missing/unexpected keys, wrong shapes, unreadable files
    │   ├── UnsupportedConfigError  fatal: a checkpoint setting we do not implement
    │   ├── PromptTooLongError      recoverable (per query): prompt longer than the context
    │   ├── KVCapacityError         recoverable (per query): a sequence outgrew its KV slot
    │   └── KVPoolExhausted         recoverable: every KV slot is taken; retry when one frees
    ├── SourceError                          streamer.ingest.errors
    │   ├── SourceUnavailable       recoverable: reconnect with backoff (refused, timeout, EOF)
    │   └── SourceFatal             fatal for that stream: retrying cannot help (401, no video)
    ├── MemoryStoreError                     memory.errors
    │   ├── SnapshotError           recoverable: snapshot corrupt or mismatched, moved aside
    │   └── StaleFence              fatal for that stream's writer: a newer owner's fence is on disk
    ├── BusError                             sinks.errors
    │   │                           recoverable: Redis unreachable, reconnect with backoff
    │   ├── BusAccessDenied         fatal at start: wrong/missing password, ACL lacks a permission
    │   └── DaemonConflict          fatal at start: another daemon runs with this daemon id
    ├── DeliveryError                        sinks.alerts.errors
    │   │                           recoverable: an alert attempt failed; retried with backoff
    │   └── DeliveryRejected        fatal for that alert: the receiver refused it (4xx), counted
    ├── QueryError                           streamer.engine.errors
    │   │                           recoverable: fails one query, carries an error ``code``
    │   ├── InvalidRequest          code "invalid_request"
    │   ├── UnknownStream           code "unknown_stream"
    │   ├── EmptyMemory             code "empty_memory"
    │   ├── Busy                    code "busy"
    │   ├── QueryTimeout            code "timeout"
    │   ├── QueryCancelled          code "cancelled"
    │   ├── NotReady                code "not_ready" (HTTP API: still starting, or stopping)
    │   ├── UnknownRule             code "unknown_rule"   streamer.engine.standing.errors
    │   ├── RuleExists              code "rule_exists"    (standing-query administration)
    │   └── ConfigRule              code "config_rule"
    └── EngineError                          streamer.engine.errors
        ├── StreamFailed            fatal for one stream: its clips keep failing to encode
        └── EngineFailed            fatal for the daemon: the device keeps failing
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
