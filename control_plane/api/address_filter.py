"""The admin listener's address filter: ISHGW_ADMIN_IP_ALLOW / ISHGW_ADMIN_IP_DENY for every route."""

from __future__ import annotations

import functools
import ipaddress

from aiohttp import web
from aiohttp.typedefs import Handler

from control_plane.api.app_keys import SETTINGS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.cache
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def address_allowed(remote: str | None, allow: tuple[str, ...], deny: tuple[str, ...]) -> bool:
    """Deny wins; an empty allow list allows every address that is not denied."""
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return not allow and not deny
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in _networks(deny)):
        return False
    return not allow or any(address in net for net in _networks(allow))


@web.middleware
async def address_filter_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ISHGW_ADMIN_IP_ALLOW / ISHGW_ADMIN_IP_DENY for every route of the admin listener."""
    settings = request.app[SETTINGS]
    if not address_allowed(request.remote, tuple(settings.admin_ip_allow), tuple(settings.admin_ip_deny)):
        return web.json_response({"error": "forbidden", "detail": "address not allowed"}, status=403)
    return await handler(request)
