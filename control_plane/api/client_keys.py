"""Admin API for client API keys: /admin/keys. The secret is in the creation answer (field ``key``) only."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

from control_plane.api import paging
from control_plane.api.app_keys import AUDIT_TARGET, STORE
from control_plane.api.apply import answer_applied, wants_wait
from control_plane.api.bodies import invalid, read_object, run, validate_strict
from control_plane.errors import InvalidInput
from control_plane.registry.client_keys import (
    UPDATABLE_KEY_FIELDS,
    ClientKey,
    ClientKeySettings,
    ClientKeyStore,
    check_key_id,
)

T = TypeVar("T")
KEY_ID_PARAM = "{key_id}"


def client_keys(request: web.Request) -> ClientKeyStore:
    return ClientKeyStore(request.app[STORE])


def key_id_of(request: web.Request) -> str:
    key_id = request.match_info["key_id"]
    try:
        check_key_id(key_id)
    except ValueError as exc:
        raise invalid("key_id", str(exc)) from None
    request[AUDIT_TARGET] = key_id
    return key_id


def _target(request: web.Request, key: ClientKey) -> None:
    request[AUDIT_TARGET] = f"{key.id} ({key.name})"


async def list_keys(request: web.Request) -> web.Response:
    """Sorted by id, paged (``limit``, ``cursor``; ``next_cursor`` in the answer)."""
    page = paging.page_of(request.query)
    keys = sorted(await run(client_keys(request).list), key=lambda k: k.id)
    chosen, cursor = paging.take(keys, lambda k: k.id, page)
    return web.json_response({"keys": [key.public() for key in chosen], "next_cursor": cursor})


async def create_key(request: web.Request) -> web.Response:
    wait = wants_wait(request)
    settings = validate_strict(ClientKeySettings, await read_object(request))
    key, secret = await run(client_keys(request).create, settings)
    _target(request, key)
    return await answer_applied(
        request, f"client key {key.id} created", wait, {**key.public(), "key": secret}, 201
    )


async def get_key(request: web.Request) -> web.Response:
    key = await run(client_keys(request).get, key_id_of(request))
    return web.json_response(key.public())


async def update_key(request: web.Request) -> web.Response:
    """Partial update: the given fields replace the current ones; the secret never changes."""
    key_id = key_id_of(request)
    wait = wants_wait(request)
    changes = await read_object(request)
    unknown = [
        {"field": str(k), "message": "unknown field"} for k in changes if k not in UPDATABLE_KEY_FIELDS
    ]
    if unknown:
        raise InvalidInput(unknown)
    key = await run(client_keys(request).update, key_id, changes)
    _target(request, key)
    return await answer_applied(request, f"client key {key.id} updated", wait, key.public(), 200)


async def delete_key(request: web.Request) -> web.Response:
    key_id = key_id_of(request)
    wait = wants_wait(request)
    key = await run(client_keys(request).delete, key_id)
    _target(request, key)
    return await answer_applied(request, f"client key {key.id} deleted", wait, None, 204)
