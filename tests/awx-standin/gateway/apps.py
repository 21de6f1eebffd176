from django.apps import AppConfig


class GatewayConfig(AppConfig):
    """The host service around django-ansible-base's oauth2_provider: users, organizations."""
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"
