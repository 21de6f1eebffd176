"""Runtime settings (PUT /_standin/settings, kept in the DB) and, for AWX, the oauthlib server
built on django-oauth-toolkit 1.7.1's validator."""
import json
import os

from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from .models import Setting

GATEWAY = settings.MODE == "gateway"
DEFAULTS = {
    "access_token_expire_seconds": settings.OAUTH2_PROVIDER["ACCESS_TOKEN_EXPIRE_SECONDS"],
    "refresh_token_expire_seconds": settings.OAUTH2_PROVIDER["REFRESH_TOKEN_EXPIRE_SECONDS"],
    "allow_oauth2_for_external_users": settings.ALLOW_OAUTH2_FOR_EXTERNAL_USERS,
    # Not AWX settings: true orders the uses of one refresh token (see README "Refresh races");
    # the cost of new password hashes (Django's default, which AWX uses, unless standin.sh start
    # was given --password-hash-iterations).
    "serialize_refresh_token_use": True,
    "password_hash_iterations": int(os.environ.get("STANDIN_PASSWORD_HASH_ITERATIONS") or PBKDF2PasswordHasher.iterations),
}


def rt_settings():
    out = dict(DEFAULTS)
    for s in Setting.objects.all():
        if s.key in out:
            out[s.key] = json.loads(s.value)
    return out


def set_settings(values):
    for k, v in values.items():
        Setting.objects.update_or_create(key=k, defaults={"value": json.dumps(v)})


_core = None


def core():
    """AWX: one oauthlib server for the process. Unlike DOT's cached TokenView core (which makes
    AWX's lifetimes sticky until restart), expires_in is read from the runtime settings."""
    global _core
    if _core is None:
        from oauth2_provider.models import get_access_token_model, get_refresh_token_model
        from oauth2_provider.oauth2_backends import OAuthLibCore
        from oauth2_provider.oauth2_validators import OAuth2Validator
        from oauthlib.oauth2 import Server

        AccessToken, RefreshToken = get_access_token_model(), get_refresh_token_model()

        class StandinValidator(OAuth2Validator):
            """DOT 1.7.1's validator, unchanged except that a client_credentials token is owned
            by the application's user (generic mode)."""

            def _create_access_token(self, expires, request, token, source_refresh_token=None):
                user = request.user
                if request.grant_type == "client_credentials" and user is None and request.client is not None:
                    user = request.client.user
                return AccessToken.objects.create(
                    user=user, scope=token["scope"], expires=expires, token=token["access_token"],
                    application=request.client, source_refresh_token=source_refresh_token)

            def _create_refresh_token(self, request, refresh_token_code, access_token):
                return RefreshToken.objects.create(
                    user=access_token.user, token=refresh_token_code, application=request.client,
                    access_token=access_token)

        _core = OAuthLibCore(Server(
            StandinValidator(),
            token_expires_in=lambda request: int(rt_settings()["access_token_expire_seconds"]),
            refresh_token_expires_in=settings.OAUTH2_PROVIDER["REFRESH_TOKEN_EXPIRE_SECONDS"]))
    return _core
