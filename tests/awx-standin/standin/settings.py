"""Django settings of the AWX stand-in, modes awx and generic (see ../README.md)."""
import os

MODE = os.environ.get("STANDIN_MODE", "awx")
if MODE not in ("awx", "generic"):
    raise RuntimeError("STANDIN_MODE must be awx or generic here (gateway mode: gateway.settings)")
RUN_DIR = os.path.abspath(os.environ.get("STANDIN_RUN_DIR") or os.path.join(os.path.dirname(__file__), "..", ".run"))
os.makedirs(RUN_DIR, exist_ok=True)

SECRET_KEY = "awx-standin-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
USE_I18N = False
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions", "oauth2_provider",
                  "awxmain", "standin"]
# Sessions and request.user for the browser sign-in (/api/login/, /api/o/authorize/); CSRF is
# checked on those two views only (standin/signin.py), where AWX runs CsrfViewMiddleware for all
# (its API views are exempt).
MIDDLEWARE = ["standin.control.StandinMiddleware", "django.middleware.common.CommonMiddleware",
              "django.contrib.sessions.middleware.SessionMiddleware",
              "django.contrib.auth.middleware.AuthenticationMiddleware"]
# Our own login and consent pages first (DOT's consent page loads a stylesheet from the internet).
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates",
              "DIRS": [os.path.join(os.path.dirname(__file__), "templates")], "APP_DIRS": True,
              "OPTIONS": {"context_processors": ["django.template.context_processors.request"]}}]
# AWX 24.6.1 awx/settings/defaults.py, but for SESSION_COOKIE_SECURE and CSRF_COOKIE_SECURE
# (True in AWX; the stand-in also serves plain HTTP).
LOGIN_URL = "/api/login/"
SESSION_COOKIE_NAME = "awx_sessionid"
SESSION_COOKIE_AGE = 1800
ROOT_URLCONF = "standin.urls"
WSGI_APPLICATION = "standin.wsgi.application"
# AWX 24.6.1 awx/settings/defaults.py: PostgreSQL, one transaction per request.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "standin",
        "USER": "standin",
        "HOST": os.environ.get("STANDIN_DB_HOST", ""),
        "PORT": os.environ.get("STANDIN_DB_PORT", ""),
        "ATOMIC_REQUESTS": True,
        "CONN_MAX_AGE": 300,
        "CONN_HEALTH_CHECKS": True,
    }
}
# AWX sets no PASSWORD_HASHERS: Django's default, PBKDF2-SHA256 with 600000 iterations in 4.2;
# the stand-in's is that hasher with its cost from the runtime settings (default 600000).
PASSWORD_HASHERS = ["standin.hashers.StandinPBKDF2PasswordHasher"]
AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.ModelBackend"]

# AWX 24.6.1 awx/settings/defaults.py.
ACCESS_TOKEN_EXPIRE_SECONDS = 31536000000
REFRESH_TOKEN_EXPIRE_SECONDS = 2628000
OAUTH2_PROVIDER = {
    "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_EXPIRE_SECONDS,
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 600,
    "REFRESH_TOKEN_EXPIRE_SECONDS": REFRESH_TOKEN_EXPIRE_SECONDS,
    "SCOPES": {"read": "Read scope", "write": "Write scope"},
}
ALLOW_OAUTH2_FOR_EXTERNAL_USERS = False
# AWX 24.6.1 lists with django-ansible-base's filter backends (its rest_filters app): these query
# parameters are not field lookups (the default of django-ansible-base 2024.12.4).
ANSIBLE_BASE_REST_FILTERS_RESERVED_NAMES = ("page", "page_size", "format", "order", "order_by", "search", "type",
                                            "host_filter", "count_disabled", "no_truncate", "limit", "validate")
MAX_PAGE_SIZE = 200
# DOT's stock models, but for the access token, which AWX swaps for its own (awxmain).
OAUTH2_PROVIDER_APPLICATION_MODEL = "oauth2_provider.Application"
OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL = "main.OAuth2AccessToken"
OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL = "oauth2_provider.RefreshToken"
OAUTH2_PROVIDER_ID_TOKEN_MODEL = "oauth2_provider.IDToken"
OAUTH2_PROVIDER_GRANT_MODEL = "oauth2_provider.Grant"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False}},
}
