"""Django settings of the gateway stand-in: the AAP gateway's OAuth2 code (django-ansible-base's
oauth2_provider and authentication apps on django-oauth-toolkit 2.x) in a small host service of
our own (users, organizations, /me/). See ../README.md."""
import os

from ansible_base.lib.dynamic_config.settings_logic import get_mergeable_dab_settings

MODE = "gateway"
if os.environ.get("STANDIN_MODE", MODE) != MODE:
    raise RuntimeError("gateway.settings serves STANDIN_MODE=gateway only")
RUN_DIR = os.path.abspath(os.environ.get("STANDIN_RUN_DIR") or os.path.join(os.path.dirname(__file__), "..", ".run-gateway"))
os.makedirs(RUN_DIR, exist_ok=True)

SECRET_KEY = "awx-standin-gateway-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
USE_I18N = False
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "rest_framework",
    "ansible_base.authentication",
    "ansible_base.rest_filters",
    "ansible_base.rest_pagination",
    "ansible_base.oauth2_provider",
    "gateway",
    "standin",  # the control API's runtime settings
]
MIDDLEWARE = [
    "standin.control.StandinMiddleware",
    "gateway.hooks.RuntimeSettingsMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "crum.CurrentRequestUserMiddleware",
]
ROOT_URLCONF = "gateway.urls"
WSGI_APPLICATION = "gateway.wsgi.application"
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
AUTH_USER_MODEL = "gateway.User"
SYSTEM_USERNAME = "_system"  # the gateway's internal user name, refused at login
ANSIBLE_BASE_ORGANIZATION_MODEL = "gateway.Organization"
ANSIBLE_BASE_TEAM_MODEL = "gateway.Team"
# Django's default hasher and cost (the runtime setting password_hash_iterations may lower it).
PASSWORD_HASHERS = ["standin.hashers.StandinPBKDF2PasswordHasher"]
AUTHENTICATION_BACKENDS = []  # django-ansible-base adds its AnsibleBaseAuth (the authenticators)
# External users (LDAP, SAML, ...) log in through gateway.authenticator_plugins.external.
ANSIBLE_BASE_AUTHENTICATOR_CLASS_PREFIXES = ["ansible_base.authentication.authenticator_plugins",
                                             "gateway.authenticator_plugins"]
# Runtime settings (PUT /_standin/settings) reach django-ansible-base through its settings hook.
ANSIBLE_BASE_SETTINGS_FUNCTION = "gateway.hooks.get_setting"
# Only the OAuth2 endpoints are served (the authenticators API would load every plugin's URLs).
ANSIBLE_BASE_APPS_EXCLUDE_VIEW_LIST = ["ansible_base.authentication"]
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.BasicAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["ansible_base.oauth2_provider.permissions.OAuth2ScopePermission"],
    # JSON only (django-ansible-base's OAuthLibCore expects UnsupportedMediaType for other bodies).
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
}
OAUTH2_PROVIDER = {}
# Our own login and consent pages first (DOT's consent page loads a stylesheet from the internet).
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates",
              "DIRS": [os.path.join(os.path.dirname(__file__), "..", "standin", "templates")], "APP_DIRS": True,
              "OPTIONS": {"context_processors": ["django.template.context_processors.request"]}}]
# The gateway's own login page is not public; the stand-in serves a session login here (a guess).
LOGIN_URL = "/api/gateway/v1/login/"

# What django-ansible-base derives from the apps above (its own defaults: 1-year access tokens,
# 2628000 s refresh tokens, its models, OAuth2 and session authentication, filters, pagination).
globals().update(get_mergeable_dab_settings(dict(globals())))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False}},
}
