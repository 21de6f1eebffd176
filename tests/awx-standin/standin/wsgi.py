import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "standin.settings")
import django  # noqa: E402

django.setup()
if os.environ.get("STANDIN_MIGRATE") == "1":
    # standin.sh start: migrate in the (single) worker before serving; saves a Django start-up.
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", interactive=False, verbosity=0)
    connections.close_all()

import time  # noqa: E402

from django.core.wsgi import get_wsgi_application  # noqa: E402

django_application = get_wsgi_application()


def _warm_up():
    """Imports every view and builds what the first requests would (before the health check
    answers): a first request must not hold up the ones arriving with it."""
    from django.contrib.auth.hashers import get_hashers
    from django.urls import get_resolver

    get_resolver().url_patterns
    get_hashers()
    from standin.runtime import core

    core()  # AWX's oauthlib server


_warm_up()


def application(environ, start_response):
    # When the request line and headers arrived (the request log's time): before Django and
    # before the body is read.
    environ["standin.arrived"] = time.time()
    return django_application(environ, start_response)
