"""The host service's own API views: API roots, /me/ and the users whose token sub-lists
django-ansible-base provides (DABOAuth2UserViewsetMixin)."""
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework import serializers
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.viewsets import ReadOnlyModelViewSet

from ansible_base.lib.serializers.common import CommonModelSerializer
from ansible_base.lib.utils.views.django_app_api import AnsibleBaseDjangoAppApiView
from ansible_base.oauth2_provider.views import DABOAuth2UserViewsetMixin
from ansible_base.rest_pagination import DefaultPaginator

V1 = "/api/gateway/v1/"


class UserSerializer(CommonModelSerializer):
    password = serializers.SerializerMethodField()

    class Meta:
        model = get_user_model()
        fields = CommonModelSerializer.Meta.fields + [
            "username", "email", "first_name", "last_name", "last_login", "password", "is_superuser"]

    def get_password(self, obj):
        return "$encrypted$"


class UserViewSet(DABOAuth2UserViewsetMixin, ReadOnlyModelViewSet, AnsibleBaseDjangoAppApiView):
    queryset = get_user_model().objects.all().order_by("id")
    serializer_class = UserSerializer
    permission_classes = [IsAuthenticated]

    def get_queryset(self):
        qs = super().get_queryset()
        user = self.request.user
        return qs if user.is_superuser else qs.filter(pk=user.pk)


class MeView(AnsibleBaseDjangoAppApiView):
    """The caller, as a one-item page (like AWX's /api/v2/me/)."""
    permission_classes = [IsAuthenticated]
    serializer_class = UserSerializer
    pagination_class = DefaultPaginator

    def get(self, request):
        qs = get_user_model().objects.filter(pk=request.user.pk)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(UserSerializer(page, many=True, context={"request": request}).data)


class ApiRoot(AnsibleBaseDjangoAppApiView):
    permission_classes = [AllowAny]
    authentication_classes = []

    def get(self, request):
        return Response({"apis": {"gateway": "/api/gateway/"}})


class GatewayRoot(ApiRoot):
    def get(self, request):
        return Response({"v1": V1})


class V1Root(ApiRoot):
    def get(self, request):
        return Response({n: "%s%s/" % (V1, n) for n in ("ping", "me", "users", "tokens", "applications")})


class Ping(ApiRoot):
    def get(self, request):
        return Response({"version": "2.5", "pong": timezone.now().isoformat(), "status": "good",
                         "db_connected": True, "proxy_connected": True})
