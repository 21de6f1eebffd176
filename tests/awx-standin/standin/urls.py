from django.urls import path

from . import control as c
from . import signin
from . import views as v

urlpatterns = [
    path("_standin/health", c.health),
    path("_standin/users", c.users),
    path("_standin/applications", c.applications),
    path("_standin/tokens", c.tokens),
    path("_standin/settings", c.settings_view),
    path("_standin/faults", c.faults_view),
    path("_standin/requests", c.requests_view),
    path("api/", v.api_root),
]

P = "api/v2/"
urlpatterns += [
    path("api/o/", v.oauth_root),
    path("api/o/token/", v.oauth_token),
    path("api/o/revoke_token/", v.oauth_revoke),
    path("api/o/authorize/", signin.authorize),
    path("api/login/", signin.login),
    path(P + "config/", v.config),
    path(P + "applications/", v.applications),
    path(P + "applications/<int:pk>/tokens/", v.application_tokens),
]

urlpatterns += [
    path(P, v.version_root),
    path(P + "ping/", v.ping),
    path(P + "me/", v.me),
    path(P + "tokens/", v.tokens),
    path(P + "tokens/<int:pk>/", v.token_detail),
    path(P + "users/<str:ukey>/", v.user_detail),
    path(P + "users/<str:ukey>/personal_tokens/", v.user_sublist("personal_tokens")),
    path(P + "users/<str:ukey>/authorized_tokens/", v.user_sublist("authorized_tokens")),
    path(P + "users/<str:ukey>/tokens/", v.user_sublist("tokens")),
]

handler404 = "standin.views.not_found"
handler500 = "standin.views.server_error"
