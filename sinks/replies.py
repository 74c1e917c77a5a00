"""Answers going back to clients: token events, and final/error events that are never lost.

A final (or error) event is stored at ``answer:<id>`` (SET EX), published on ``reply:<id>`` and
only then is the request's stream entry XACKed, all in one MULTI/EXEC: a daemon killed before
that leaves the entry pending, so it is redelivered (XAUTOCLAIM, or this consumer's restart).
On a Redis Cluster the store is one transaction on the request's slot and the publish and ack
follow it (see :meth:`ReplyPublisher._exec_final_on_cluster`).
Token events are best effort: while Redis is away they are dropped (counted) without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import ResponseError

from sinks.connection import (
    REDIS_DOWN_ERRORS,
    RedisClient,
    is_cluster,
    open_redis,
    redis_backoff,
)
from sinks.domain import wire_answer
from sinks.redact import redact_url
from sinks.schema import Answer, error_event, final_event, token_event
from sinks.settings import Keys, QuerySettings, RedisSettings
from streamer.engine.errors import QueryError
from streamer.engine.types import Answer as EngineAnswer
from streamer.engine.types import Ticket as QueryTicket

log = logging.getLogger(__name__)

# Error codes a client may retry with the same request id: their stored event does not count
# as "answered" for deduplication, and their seen-marker is dropped.
RETRYABLE_CODES = frozenset({"busy"})
TOKEN_PUBLISH_TIMEOUT_S = 1.0  # a token publish never holds the generation loop longer
STORE_ATTEMPT_TIMEOUT_S = 5.0  # one MULTI/EXEC attempt of a final event


class ReplyPublisher:
    """Publishes one request's events. Safe to share between concurrent queries."""

    def __init__(
        self,
        redis: RedisSettings,
        query: QuerySettings,
        *,
        client: RedisClient | None = None,
        daemon_id: str | None = None,
    ) -> None:
        """``daemon_id``: stamped on every final answer (``daemon``), for fleets."""
        self._redis_settings = redis
        self._daemon_id = daemon_id
        self._query = query
        self._keys = Keys(redis.prefix)
        self._owns_client = client is None
        self._client = client or open_redis(
            redis, read_timeout_s=redis.connect_timeout_s + STORE_ATTEMPT_TIMEOUT_S
        )
        # While Redis is down, token publishes are skipped until this monotonic time.
        self._tokens_paused_until = 0.0
        self.tokens_published = 0
        self.tokens_dropped = 0
        self.finals_stored = 0
        self.finals_unstored = 0  # gave up after final_store_deadline_s; left for redelivery

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> ReplyPublisher:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ tokens (best effort)

    async def token(self, request_id: str, index: int, text: str) -> None:
        """Publish generated text piece ``index`` (0-based); dropped (counted) if Redis is away."""
        if time.monotonic() < self._tokens_paused_until:
            self.tokens_dropped += 1
            return
        try:
            async with asyncio.timeout(TOKEN_PUBLISH_TIMEOUT_S):
                await self._client.publish(
                    self._keys.reply(request_id), token_event(request_id, index, text)
                )
        except REDIS_DOWN_ERRORS as exc:
            self._tokens_paused_until = time.monotonic() + self._redis_settings.backoff_initial_s
            self.tokens_dropped += 1
            log.debug("token %d of %s dropped: %s", index, request_id, exc)
            return
        self.tokens_published += 1

    # ------------------------------------------------------------------ final events

    async def finish(self, ticket: QueryTicket, answer: EngineAnswer | Answer) -> None:
        """Store + publish the final answer, then ack.

        Retries across a Redis outage for up to ``final_store_deadline_s``; if it still cannot
        be stored, the event is logged at ERROR, ``finals_unstored`` counts it and the entry
        stays un-acked (redelivered later). Never raises for Redis trouble.
        """
        if answer.id != ticket.request.id:
            raise ValueError(f"answer id {answer.id!r} is not the ticket's {ticket.request.id!r}")
        wired = wire_answer(answer)
        if wired.daemon is None and self._daemon_id is not None:
            wired = wired.model_copy(update={"daemon": self._daemon_id})
        await self._store_final(
            ticket.request.id,
            ticket.entry_id,
            final_event(wired),
            forget_seen=False,
            ack_stream=ticket.ack_stream,
        )

    async def fail(
        self, ticket: QueryTicket, error: QueryError | str, message: str | None = None
    ) -> None:
        """Store + publish an error event (a QueryError, or a code and message), then ack."""
        await self.reject(
            ticket.request.id, ticket.entry_id, error, message, ack_stream=ticket.ack_stream
        )

    async def confirm(self, request_id: str, event: str) -> bool:
        """Store and publish a final event that answers no ticket (e.g. a forget confirmation)."""
        return await self._store_final(request_id, None, event, forget_seen=False)

    async def reject(
        self,
        request_id: str,
        entry_id: str | None,
        error: QueryError | str,
        message: str | None = None,
        *,
        ack_stream: str | None = None,
    ) -> bool:
        """Like :meth:`fail` for a request that never became a ticket (invalid, expired).

        ``ack_stream``: the stream holding ``entry_id`` (default: the request stream).
        Returns whether the event was stored (see :meth:`finish`).
        """
        if isinstance(error, QueryError):
            code, text = error.code, message or str(error) or error.code
        else:
            code, text = error, message or error
        return await self._store_final(
            request_id,
            entry_id,
            error_event(request_id, code, text),
            forget_seen=code in RETRYABLE_CODES,
            ack_stream=ack_stream,
        )

    async def deliver_once(self, request_id: str, entry_id: str | None, payload: str) -> bool:
        """Store a coordinator's final with SET NX, publish it only if stored here, then ack.

        Two coordinators of one request (a claimed entry whose first coordinator was only
        slow) never both deliver: the second finds the answer taken and just acks. Returns
        whether this call delivered. Raises the Redis error when Redis is away.
        """
        keys = self._keys
        stored = await self._client.set(
            keys.answer(request_id), payload, nx=True, ex=self._query.answer_ttl_s
        )
        # Two commands, not a pipeline: a Cluster pipeline takes no PUBLISH.
        if stored:
            await self._client.publish(keys.reply(request_id), payload)
        if entry_id is not None:
            await self._client.xack(keys.requests, self._query.consumer_group, entry_id)
        if stored:
            self.finals_stored += 1
        return bool(stored)

    async def _store_final(
        self,
        request_id: str,
        entry_id: str | None,
        payload: str,
        *,
        forget_seen: bool,
        ack_stream: str | None = None,
    ) -> bool:
        give_up_at = time.monotonic() + self._query.final_store_deadline_s
        backoff = redis_backoff(self._redis_settings)
        while True:
            try:
                async with asyncio.timeout(STORE_ATTEMPT_TIMEOUT_S):
                    await self._exec_final(
                        request_id,
                        entry_id,
                        payload,
                        forget_seen,
                        ack_stream or self._keys.requests,
                    )
            except REDIS_DOWN_ERRORS as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > give_up_at:
                    self.finals_unstored += 1
                    # Never silently: the event goes to the log, the entry stays pending.
                    log.error(
                        "could not store the final event of %s in Redis at %s (%s); "
                        "entry %s left un-acked for redelivery; event: %s",
                        request_id,
                        redact_url(self._redis_settings.url),
                        exc,
                        entry_id,
                        payload,
                    )
                    return False
                log.warning(
                    "storing the final event of %s failed (%s); retrying in %.1f s",
                    request_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                self.finals_stored += 1
                return True

    async def _exec_final(
        self,
        request_id: str,
        entry_id: str | None,
        payload: str,
        forget_seen: bool,
        ack_stream: str,
    ) -> None:
        keys = self._keys
        if is_cluster(self._client):
            await self._exec_final_on_cluster(
                request_id, entry_id, payload, forget_seen, ack_stream
            )
            return
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(keys.answer(request_id), payload, ex=self._query.answer_ttl_s)
            pipe.publish(keys.reply(request_id), payload)
            if forget_seen:
                pipe.delete(keys.seen(request_id))
            if entry_id is not None:
                pipe.xack(ack_stream, self._query.consumer_group, entry_id)
            results = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]  # the store itself failed: retry
        for result in results[1:]:
            # e.g. NOGROUP after Redis lost its data: the entry is gone, nothing left to ack.
            if isinstance(result, Exception):
                log.warning("while finishing %s: %s", request_id, result)

    async def _exec_final_on_cluster(
        self,
        request_id: str,
        entry_id: str | None,
        payload: str,
        forget_seen: bool,
        ack_stream: str,
    ) -> None:
        """The same three steps on a Cluster, where one MULTI/EXEC covers one slot only.

        The answer and seen-marker share the request's hash tag: stored in one transaction.
        Then the publish (no pipelined PUBLISH on a Cluster) and the ack (the request stream
        lives in another slot). A daemon killed between the store and the ack leaves the
        entry pending; its redelivery finds the stored answer and is only acked (dedupe).
        """
        keys = self._keys
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(keys.answer(request_id), payload, ex=self._query.answer_ttl_s)
            if forget_seen:
                pipe.delete(keys.seen(request_id))
            await pipe.execute()
        try:
            await self._client.publish(keys.reply(request_id), payload)
            if entry_id is not None:
                await self._client.xack(ack_stream, self._query.consumer_group, entry_id)
        except ResponseError as exc:
            log.warning("while finishing %s: %s", request_id, exc)
