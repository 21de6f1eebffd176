"""Stand-in state kept in the DB, beside django-oauth-toolkit's own tables."""
import hashlib

from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import models
from django.db.backends.signals import connection_created
from django.db.models.signals import pre_save
from django.dispatch import receiver
from oauth2_provider.models import AccessToken
from oauthlib import oauth2


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    algorithm = "pbkdf2_sha256_fast"
    iterations = 1000


class Profile(models.Model):
    """external: name of the external auth provider ("ldap", "saml", ...) or ""."""
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="standin_profile")
    external = models.CharField(max_length=32, blank=True, default="")


class TokenInfo(models.Model):
    """AWX's OAuth2AccessToken.description, which DOT's stock model lacks."""
    access_token = models.OneToOneField(settings.OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL, on_delete=models.CASCADE, related_name="standin_info")
    description = models.TextField(blank=True, default="")


class Setting(models.Model):
    """Runtime settings (PUT /_standin/settings); values are JSON."""
    key = models.CharField(max_length=64, primary_key=True)
    value = models.TextField()


def external_provider(user):
    if user is None:
        return ""
    try:
        return user.standin_profile.external
    except Profile.DoesNotExist:
        return ""


def stored(value):
    """Token value as kept in the DB: plain like AWX, `$sha256$<hex>` like the gateway."""
    if settings.MODE == "gateway":
        return "$sha256$" + hashlib.sha256(value.encode()).hexdigest()
    return value


def sha256_of_stored(value):
    if value.startswith("$sha256$"):
        return value[len("$sha256$"):]
    return hashlib.sha256(value.encode()).hexdigest()


@receiver(pre_save, sender=AccessToken)
def refuse_external_users(sender, instance, **kwargs):
    # AWX awx/main/models/oauth.py OAuth2AccessToken.save: same refusal, same text.
    from .runtime import rt_settings
    provider = external_provider(instance.user)
    if provider and not rt_settings()["allow_oauth2_for_external_users"]:
        raise oauth2.AccessDeniedError(
            "OAuth2 Tokens cannot be created by users associated with an external authentication provider ({})".format(provider))


@receiver(connection_created)
def sqlite_pragmas(sender, connection, **kwargs):
    if connection.vendor == "sqlite":
        with connection.cursor() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA busy_timeout=30000")
