"""The host service's settings: what the control API's runtime settings mean to
django-ansible-base (its settings hook) and to django-oauth-toolkit (its OAUTH2_PROVIDER)."""
import threading

from django.conf import settings

from ansible_base.lib.utils.settings import SettingNotSetException


def runtime():
    from standin.runtime import rt_settings
    return rt_settings()


def oauth2_provider(rt):
    return dict(settings.OAUTH2_PROVIDER, ACCESS_TOKEN_EXPIRE_SECONDS=int(rt["access_token_expire_seconds"]),
                REFRESH_TOKEN_EXPIRE_SECONDS=int(rt["refresh_token_expire_seconds"]))


def get_setting(name):
    """ANSIBLE_BASE_SETTINGS_FUNCTION: the gateway keeps such settings in its database too."""
    if name == "OAUTH2_PROVIDER":
        return oauth2_provider(runtime())
    if name == "ALLOW_OAUTH2_FOR_EXTERNAL_USERS":
        return bool(runtime()["allow_oauth2_for_external_users"])
    raise SettingNotSetException(name)


class RuntimeSettingsMiddleware:
    """django-oauth-toolkit reads OAUTH2_PROVIDER once per process (its TokenView keeps the
    oauthlib server it built at the first request). When the runtime settings change, this process
    takes the new values as a gateway restarted with them would."""

    lock = threading.Lock()
    applied = None

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path.startswith("/_standin/"):
            rt = runtime()
            wanted = oauth2_provider(rt)
            if wanted != RuntimeSettingsMiddleware.applied:
                with RuntimeSettingsMiddleware.lock:
                    self.apply(wanted)
        return self.get_response(request)

    @classmethod
    def apply(cls, wanted):
        from oauth2_provider import views as dot_views
        from oauth2_provider.settings import oauth2_settings

        from ansible_base.oauth2_provider import views as dab_views

        settings.OAUTH2_PROVIDER = wanted
        oauth2_settings.reload()
        for view in (dab_views.TokenView, dot_views.RevokeTokenView, dot_views.AuthorizationView):
            if "_oauthlib_core" in view.__dict__:
                delattr(view, "_oauthlib_core")
        cls.applied = wanted
