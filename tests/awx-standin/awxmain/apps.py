from django.apps import AppConfig


class MainConfig(AppConfig):
    """AWX's own OAuth2 token model (AWX keeps it in its app "main")."""
    name = "awxmain"
    label = "main"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from .models import _prevent_search

        _prevent_search()
