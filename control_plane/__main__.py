"""`python -m control_plane`: run the controller (admin API + reconcile loop)."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from control_plane.app import create_app
from control_plane.settings import Settings


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    host, port = settings.admin_host_port
    web.run_app(create_app(settings), host=host, port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
