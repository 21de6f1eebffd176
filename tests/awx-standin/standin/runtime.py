"""Runtime settings and the oauthlib server built on django-oauth-toolkit's validator."""
import json

from django.conf import settings
from oauth2_provider.models import AccessToken, RefreshToken
from oauth2_provider.oauth2_backends import OAuthLibCore
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauthlib.oauth2 import Server

from .models import Setting, stored

DEFAULTS = {
    "access_token_expire_seconds": settings.ACCESS_TOKEN_EXPIRE_SECONDS,
    "refresh_token_expire_seconds": settings.REFRESH_TOKEN_EXPIRE_SECONDS,
    "allow_oauth2_for_external_users": settings.ALLOW_OAUTH2_FOR_EXTERNAL_USERS,
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


class StandinValidator(OAuth2Validator):
    """DOT 1.7.1's validator, unchanged except:
    - gateway mode stores token values as `$sha256$<hex>` (django-ansible-base) and hashes
      what it is given before looking a token up; revoke_token is left alone, so (as on the
      gateway) revoking by the plain value finds nothing;
    - a client_credentials token is owned by the application's user (generic mode)."""

    def _load_access_token(self, token):
        return AccessToken.objects.select_related("application", "user").filter(token=stored(token)).first()

    def validate_refresh_token(self, refresh_token, client, request, *args, **kwargs):
        return super().validate_refresh_token(stored(refresh_token), client, request, *args, **kwargs)

    def _create_access_token(self, expires, request, token, source_refresh_token=None):
        user = request.user
        if request.grant_type == "client_credentials" and user is None and request.client is not None:
            user = request.client.user
        return AccessToken.objects.create(
            user=user, scope=token["scope"], expires=expires, token=stored(token["access_token"]),
            application=request.client, source_refresh_token=source_refresh_token)

    def _create_refresh_token(self, request, refresh_token_code, access_token):
        return RefreshToken.objects.create(
            user=access_token.user, token=stored(refresh_token_code), application=request.client,
            access_token=access_token)


_core = None


def core():
    """One oauthlib server for the process. Unlike DOT's cached TokenView core (which makes
    AWX's lifetimes sticky until restart), expires_in is read from the runtime settings."""
    global _core
    if _core is None:
        _core = OAuthLibCore(Server(
            StandinValidator(),
            token_expires_in=lambda request: int(rt_settings()["access_token_expire_seconds"]),
            refresh_token_expires_in=settings.REFRESH_TOKEN_EXPIRE_SECONDS))
    return _core
