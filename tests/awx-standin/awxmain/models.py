"""The access-token model AWX 24.6.1 swaps in for django-oauth-toolkit's (awx/main/models/oauth.py
has these fields): DOT's token plus description, last_used and modified, ordered by id."""
from django.conf import settings
from django.db import models
from oauth2_provider.models import AbstractAccessToken


class OAuth2AccessToken(AbstractAccessToken):
    class Meta:
        verbose_name = "access token"
        ordering = ("id",)

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, blank=True, null=True,
                             related_name="main_oauth2accesstoken", help_text="The user representing the token owner")
    description = models.TextField(default="", blank=True)
    last_used = models.DateTimeField(null=True, default=None, editable=False)
    scope = models.TextField(blank=True, default="write")
    modified = models.DateTimeField(editable=False, auto_now=True)


def _prevent_search():
    """awx/main/models/__init__.py: these fields cannot be used in list filters (403)."""
    from django.contrib.auth import get_user_model
    from oauth2_provider.models import get_application_model, get_grant_model, get_refresh_token_model

    from ansible_base.lib.utils.models import prevent_search

    prevent_search(get_user_model()._meta.get_field("password"))
    prevent_search(OAuth2AccessToken._meta.get_field("token"))
    prevent_search(get_refresh_token_model()._meta.get_field("token"))
    prevent_search(get_application_model()._meta.get_field("client_secret"))
    prevent_search(get_application_model()._meta.get_field("client_id"))
    prevent_search(get_grant_model()._meta.get_field("code"))
