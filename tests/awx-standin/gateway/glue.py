"""What the control API needs from the gateway flavour (django-ansible-base's models)."""
from oauth2_provider.generators import generate_client_secret

from ansible_base.authentication.models import Authenticator, AuthenticatorUser
from ansible_base.oauth2_provider.utils import is_external_account

LOCAL = "ansible_base.authentication.authenticator_plugins.local"
EXTERNAL = "gateway.authenticator_plugins.external"


def ensure_local_authenticator():
    """The gateway's "Local Database Authenticator", tried after the external ones."""
    if not Authenticator.objects.filter(type=LOCAL).exists():
        Authenticator.objects.create(name="Local Database Authenticator", type=LOCAL, enabled=True,
                                     create_objects=True, remove_users=False, order=1000, configuration={})


def external_of(user):
    provider = is_external_account(user)
    return provider.name if provider else ""


def set_external(user, provider):
    """Links the user to an enabled external authenticator named `provider` (none for "")."""
    AuthenticatorUser.objects.filter(user=user).exclude(provider__type=LOCAL).delete()
    if not provider:
        return
    auth = Authenticator.objects.filter(name=provider).first()
    if auth is None:
        auth = Authenticator.objects.create(name=provider, type=EXTERNAL, enabled=True, create_objects=False,
                                            remove_users=False, order=1, configuration={})
    AuthenticatorUser.objects.create(provider=auth, user=user, uid=user.username, extra_data={})


def description_of(token):
    return token.description


def save_application(app, secret, created):
    """django-oauth-toolkit 2.x hashes the client secret on save: only a new one is known."""
    if created and not secret:
        secret = generate_client_secret()
    if secret:
        app.client_secret = secret
    app.save()
    return secret


def known_secret(app):
    return None  # stored hashed


def request_username(request):
    user = getattr(request, "user", None)  # DRF sets the authenticated user on the request
    return user.username if user is not None and user.is_authenticated else None
