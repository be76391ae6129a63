"""The Bank over HTTP (``incident serve``): its commands as JSON, its read models, an
account's state at any version, and the live log as Server-Sent Events. See
docs/async.md; the generic part is :mod:`incident.web`.

- ``POST /commands/OpenAccount`` with ``{"aggregate_id": "ACC1"}``, and so on for every
  Bank command (``DepositMoney``, ``WithdrawMoney``, ``RequestTransfer``, ...).
- ``GET /accounts/ACC1``: the ``BankAccount`` read model; ``?version=3``: the account's
  state after its first 3 events, folded from its stream.
- ``GET /transfers/T1``: the ``Transfer`` read model.
- ``GET /events?after=N``: the log, live.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...command_handler.asynchronous import AsyncCommandHandler
from ...web import command_app, json_response, problem, whole_number
from . import build_async
from .account import bank_account
from .projections import BankAccount, Transfer

__all__ = ["RETRIES_VARIABLE", "STORE_VARIABLE", "app", "app_from_environment"]

DEFAULT_STORE = "sqlite:///incident-demo.db"
#: where ``incident serve --workers N`` tells its server processes the store (and retries)
STORE_VARIABLE = "INCIDENT_SERVE_STORE"
RETRIES_VARIABLE = "INCIDENT_SERVE_RETRIES"


def app(store: str = DEFAULT_STORE, **options: Any) -> Starlette:
    """The Bank's ASGI app on the store at ``store`` (opened when the server starts);
    ``options`` go to the AsyncCommandHandler (``retries=``, ``cache_size=``, ...)."""
    return command_app(
        lambda: build_async(store, **options),
        routes=[
            Route("/accounts/{account_id}", account, methods=["GET"]),
            Route("/transfers/{transfer_id}", transfer, methods=["GET"]),
        ],
    )


def app_from_environment() -> Starlette:
    """The app each server process of ``incident serve --workers N`` builds (uvicorn
    starts workers from an import string): the store and retries come from
    ``INCIDENT_SERVE_STORE`` and ``INCIDENT_SERVE_RETRIES``."""
    retries = os.environ.get(RETRIES_VARIABLE)
    options = {} if not retries else {"retries": int(retries)}
    return app(os.environ.get(STORE_VARIABLE, DEFAULT_STORE), **options)


async def account(request: Request) -> Response:
    handler: AsyncCommandHandler = request.app.state.handler
    account_id = request.path_params["account_id"]
    version_text = request.query_params.get("version")
    if version_text is None:
        row = await handler.projection_store.get(BankAccount, account_id)
        if row is None:
            return problem(404, "NotFound", f"No account {account_id!r}")
        return json_response(row)
    version = whole_number(version_text)
    if version is None or version < 1:
        return problem(422, "InvalidVersion", f"version must be an int >= 1, got {version_text!r}")
    events = []
    async for recorded in handler.event_store.stream(account_id):
        if recorded.aggregate != bank_account.name:
            return problem(404, "NotFound", f"{account_id!r} is a {recorded.aggregate}")
        events.append(recorded)
        if len(events) == version:
            break
    if not events:
        return problem(404, "NotFound", f"No account {account_id!r}")
    if len(events) < version:
        return problem(
            404, "NotFound", f"Account {account_id!r} is at version {len(events)}, not {version}"
        )
    state = bank_account.fold(events)
    return json_response({"account_id": account_id, "version": version, "state": state})


async def transfer(request: Request) -> Response:
    handler: AsyncCommandHandler = request.app.state.handler
    transfer_id = request.path_params["transfer_id"]
    row = await handler.projection_store.get(Transfer, transfer_id)
    if row is None:
        return problem(404, "NotFound", f"No transfer {transfer_id!r}")
    return json_response(row)
