"""Stands in for the gateway's external authenticators (LDAP, SAML, RADIUS...): there is no
directory to ask, so a user linked to one of these authenticators (POST /_standin/users with
"external") is checked against the password the control API set. Being linked to a non-local
authenticator is what makes django-ansible-base refuse OAuth2 tokens to the user."""
import logging

from django.contrib.auth.backends import ModelBackend

from ansible_base.authentication.authenticator_plugins.base import AbstractAuthenticatorPlugin, BaseAuthenticatorConfiguration
from ansible_base.authentication.models import AuthenticatorUser
from ansible_base.authentication.utils.claims import update_user_claims

logger = logging.getLogger("gateway.authenticator_plugins.external")


class ExternalConfiguration(BaseAuthenticatorConfiguration):
    documentation_url = None


class AuthenticatorPlugin(ModelBackend, AbstractAuthenticatorPlugin):
    configuration_class = ExternalConfiguration
    logger = logger
    type = "external"
    category = "password"

    def __init__(self, database_instance=None, *args, **kwargs):
        super().__init__(database_instance, *args, **kwargs)

    def authenticate(self, request, username=None, password=None, **kwargs):
        if not username or not password or not self.database_instance or not self.database_instance.enabled:
            return None
        if not AuthenticatorUser.objects.filter(provider=self.database_instance, uid=username).exists():
            return None
        user = super().authenticate(request, username, password, **kwargs)
        return update_user_claims(user, self.database_instance, [])
