"""Errors of standing-query administration (see the tree in ``model.errors``).

Each fails one admin request (recoverable; its ``code`` goes to the client)::

    QueryError
    ├── UnknownRule      no rule of that name
    ├── RuleExists       a rule of that name exists (add without replace)
    └── ConfigRule       the rule comes from the config file: change it there
"""

from __future__ import annotations

from streamer.engine.errors import QueryError


class UnknownRule(QueryError):
    code = "unknown_rule"


class RuleExists(QueryError):
    code = "rule_exists"


class ConfigRule(QueryError):
    code = "config_rule"
