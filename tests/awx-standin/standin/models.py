"""Stand-in state kept in the DB: runtime settings and, for AWX, who is an external user."""
import hashlib

from django.conf import settings
from django.db import models
from django.db.models.signals import pre_save
from django.dispatch import receiver
from oauth2_provider.models import get_access_token_model
from oauthlib import oauth2


class Profile(models.Model):
    """external: name of the external auth provider ("ldap", "saml", ...) or ""."""
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="standin_profile")
    external = models.CharField(max_length=32, blank=True, default="")


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
    """Token value as kept in the DB: plain, like AWX (the gateway's own code hashes)."""
    return value


def sha256_of_stored(value):
    if value.startswith("$sha256$"):
        return value[len("$sha256$"):]
    return hashlib.sha256(value.encode()).hexdigest()


@receiver(pre_save)
def refuse_external_users(sender, instance, **kwargs):
    if settings.MODE == "gateway" or sender is not get_access_token_model():
        return  # django-ansible-base's own model does this
    # AWX awx/main/models/oauth.py OAuth2AccessToken.save: same refusal, same text.
    from .runtime import rt_settings
    provider = external_provider(instance.user)
    if provider and not rt_settings()["allow_oauth2_for_external_users"]:
        raise oauth2.AccessDeniedError(
            "OAuth2 Tokens cannot be created by users associated with an external authentication provider ({})".format(provider))
