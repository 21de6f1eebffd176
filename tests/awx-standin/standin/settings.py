"""Django settings of the AWX stand-in (see ../README.md)."""
import os

MODE = os.environ.get("STANDIN_MODE", "awx")
if MODE not in ("awx", "gateway", "generic"):
    raise RuntimeError("STANDIN_MODE must be awx, gateway or generic")
RUN_DIR = os.path.abspath(os.environ.get("STANDIN_RUN_DIR") or os.path.join(os.path.dirname(__file__), "..", ".run"))
os.makedirs(RUN_DIR, exist_ok=True)

SECRET_KEY = "awx-standin-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
USE_I18N = False
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "oauth2_provider", "standin"]
MIDDLEWARE = ["standin.control.StandinMiddleware", "django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "standin.urls"
WSGI_APPLICATION = "standin.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(RUN_DIR, "standin.sqlite3"),
        "OPTIONS": {"timeout": 30},
    }
}
# Cheap hashing: the stand-in answers ~50 concurrent password checks (not an AWX behaviour).
PASSWORD_HASHERS = ["standin.models.FastPBKDF2PasswordHasher"]
AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.ModelBackend"]

# AWX 24.6.1 awx/settings/defaults.py; the gateway (django-ansible-base) defaults to 1 year.
ACCESS_TOKEN_EXPIRE_SECONDS = 31536000 if MODE == "gateway" else 31536000000
REFRESH_TOKEN_EXPIRE_SECONDS = 2628000
OAUTH2_PROVIDER = {
    "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_EXPIRE_SECONDS,
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 600,
    "REFRESH_TOKEN_EXPIRE_SECONDS": REFRESH_TOKEN_EXPIRE_SECONDS,
    "SCOPES": {"read": "Read scope", "write": "Write scope"},
}
ALLOW_OAUTH2_FOR_EXTERNAL_USERS = False
# DOT's stock models (AWX swaps in its own; the stand-in keeps extras in side tables).
OAUTH2_PROVIDER_APPLICATION_MODEL = "oauth2_provider.Application"
OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL = "oauth2_provider.AccessToken"
OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL = "oauth2_provider.RefreshToken"
OAUTH2_PROVIDER_ID_TOKEN_MODEL = "oauth2_provider.IDToken"
OAUTH2_PROVIDER_GRANT_MODEL = "oauth2_provider.Grant"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False}},
}
