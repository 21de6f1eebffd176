from django.urls import include, path

from ansible_base.lib.dynamic_config import dynamic_urls
from ansible_base.lib.routers import AssociationResourceRouter
from standin import control as c
from standin import signin

from . import views as v

router = AssociationResourceRouter()
router.register(r"users", v.UserViewSet, basename="user")

urlpatterns = [
    path("_standin/health", c.health),
    path("_standin/users", c.users),
    path("_standin/applications", c.applications),
    path("_standin/tokens", c.tokens),
    path("_standin/settings", c.settings_view),
    path("_standin/faults", c.faults_view),
    path("_standin/requests", c.requests_view),
    path("api/", v.ApiRoot.as_view()),
    path("api/gateway/", v.GatewayRoot.as_view()),
    path("api/gateway/v1/", v.V1Root.as_view()),
    path("api/gateway/v1/ping/", v.Ping.as_view()),
    path("api/gateway/v1/me/", v.MeView.as_view()),
    path("api/gateway/v1/login/", signin.login),
    path("api/gateway/v1/", include(router.urls)),
    # django-ansible-base's own: tokens/, applications/ (and authenticators/), and /o/...
    path("api/gateway/v1/", include(dynamic_urls.api_version_urls)),
    path("", include(dynamic_urls.root_urls)),
]
