"""`python -m control_plane`: run the controller (admin API + reconcile loop)."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from control_plane.admin_tls import AdminTlsError, admin_ssl_context
from control_plane.app import create_app
from control_plane.jwt_keys import JwtConfigError
from control_plane.registry.sealing import RegistryKeyError
from control_plane.runtime_tuning import tune
from control_plane.settings import Settings


def main() -> None:
    tune()  # before any thread allocates (runtime_tuning.py)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    host, port = settings.admin_host_port
    try:
        ssl_context = admin_ssl_context(settings)
        app = create_app(settings)
        # Startup (the app's first cleanup context) opens the registry: RegistryKeyError comes from there.
        web.run_app(app, host=host, port=port, access_log=None, print=None, ssl_context=ssl_context)
    except (AdminTlsError, JwtConfigError, RegistryKeyError) as exc:
        logging.getLogger("control_plane").error("refusing to start: %s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
