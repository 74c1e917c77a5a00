"""Standing-query administration over Redis: ``alert add|list|rm|test`` requests.

A request is one JSON object on ``Keys.alerts_admin`` (``AdminRequest``), validated like query
requests (size bound, strict fields, the rule itself by its config model); the reply is a
``final`` or ``error`` event on ``Keys.reply(id)``, also kept at ``Keys.answer(id)`` for
``ADMIN_ANSWER_TTL_S`` so a client that subscribed late still finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sinks.connection import REDIS_DOWN_ERRORS, RedisClient, raise_if_cancelled
from sinks.schema import MAX_REQUEST_BYTES, one_line, salvage_request_id
from sinks.settings import Keys
from streamer.engine.errors import InvalidRequest, QueryError
from streamer.engine.standing.rules import RULE_NAME_PATTERN, ConditionRule, Rule, SummaryRule
from streamer.ingest.backoff import Backoff

if TYPE_CHECKING:
    from streamer.app.alerts import AlertManager

log = logging.getLogger(__name__)

ADMIN_ANSWER_TTL_S = 60
_RULE: TypeAdapter[ConditionRule | SummaryRule] = TypeAdapter(Rule)


class AdminRequest(BaseModel):
    """One ``alert`` command over Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    op: Literal["add", "list", "rm", "test"]
    rule: dict[str, Any] | None = None  # add; test of an unsaved condition
    name: str | None = Field(None, pattern=RULE_NAME_PATTERN)  # rm, test
    replace: bool = False  # add: replace a run-time rule of the same name


class AlertAdmin:
    """Answers admin requests for one ``AlertManager``."""

    def __init__(self, alerts: AlertManager, client: RedisClient, keys: Keys) -> None:
        self._alerts, self._client, self._keys = alerts, client, keys

    async def run(self, backoff: Backoff) -> None:
        """Serve the admin channel until cancelled, resubscribing while Redis is away."""
        while True:
            try:
                await self.serve()
            except REDIS_DOWN_ERRORS as exc:
                log.warning("alerts: admin channel lost: %s", one_line(exc))
                await asyncio.sleep(backoff.next_delay())

    async def serve(self) -> None:
        """Answer ``alert`` requests on ``Keys.alerts_admin`` until cancelled."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._keys.alerts_admin)
            while True:
                message = await pubsub.get_message(timeout=1.0)
                raise_if_cancelled()
                if message is not None:
                    await self.handle_admin(message["data"])
        finally:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await pubsub.aclose()

    async def handle_admin(self, data: bytes | str) -> None:
        """Run one admin request and publish its reply; a bad one gets an error reply."""
        try:
            if len(data) > MAX_REQUEST_BYTES:
                raise InvalidRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
            try:
                request = AdminRequest.model_validate_json(data)
            except ValidationError as exc:
                raise InvalidRequest(_first_error(exc)) from exc
        except InvalidRequest as exc:
            request_id = salvage_request_id(data)
            log.info("alerts: bad admin request: %s", one_line(exc))
            if request_id is not None:
                await self._reply(request_id, error=exc)
            return
        try:
            result = await self._admin(request)
        except QueryError as exc:
            await self._reply(request.id, error=exc)
        except TimeoutError:
            await self._reply(request.id, error=QueryError("the evaluation timed out"))
        except REDIS_DOWN_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 (one request's failure: replied, logged)
            log.warning("alerts: admin %s failed: %s: %s", request.op, type(exc).__name__,
                        one_line(exc))  # fmt: skip
            await self._reply(request.id, error=QueryError(f"{type(exc).__name__}: {exc}"))
        else:
            await self._reply(request.id, result=result)

    async def _admin(self, request: AdminRequest) -> dict[str, Any]:
        if request.op == "list":
            return {"rules": self._alerts.describe()}
        if request.op == "rm":
            if request.name is None:
                raise InvalidRequest("rm needs a name")
            await self._alerts.remove(request.name)
            return {"removed": request.name}
        rule = None
        if request.rule is not None:
            try:
                rule = _RULE.validate_python(request.rule)
            except ValidationError as exc:
                raise InvalidRequest(_first_error(exc)) from exc
        if request.op == "add":
            if rule is None:
                raise InvalidRequest("add needs a rule")
            await self._alerts.add(rule, replace_rule=request.replace)
            return {"added": rule.name}
        if rule is not None and not isinstance(rule, ConditionRule):
            raise InvalidRequest("only conditions have a score")
        return {"test": await self._alerts.test(request.name, rule)}

    async def _reply(
        self,
        request_id: str,
        *,
        result: dict[str, Any] | None = None,
        error: QueryError | None = None,
    ) -> None:
        if error is not None:
            event: dict[str, Any] = {
                "v": 1, "type": "error", "id": request_id, "code": error.code, "message": str(error)
            }  # fmt: skip
        else:
            event = {"v": 1, "type": "final", "id": request_id, **(result or {})}
        payload = json.dumps(event)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.answer(request_id), payload, ex=ADMIN_ANSWER_TTL_S)
            pipe.publish(self._keys.reply(request_id), payload)
            await pipe.execute()


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])
