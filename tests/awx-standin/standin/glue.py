"""What the control API needs from the AWX flavours (DOT's stock models and side tables)."""
from .models import Profile


def external_of(user):
    try:
        return user.standin_profile.external
    except Profile.DoesNotExist:
        return ""


def set_external(user, provider):
    Profile.objects.update_or_create(user=user, defaults={"external": provider})


def description_of(token):
    return token.description


def save_application(app, secret, created):
    """DOT 1.7.1 keeps the client secret as given (AWX encrypts it, reversibly)."""
    if secret:
        app.client_secret = secret
    app.save()
    return app.client_secret


def known_secret(app):
    return app.client_secret


def request_username(request):
    return None  # the AWX views record the user themselves
