# The token model comes first (django-oauth-toolkit's RefreshToken points at it); its links to
# DOT's models are added in 0002, once those exist.
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = [migrations.swappable_dependency(settings.AUTH_USER_MODEL)]
    run_before = [("oauth2_provider", "0001_initial")]

    operations = [
        migrations.CreateModel(
            name="OAuth2AccessToken",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("token", models.CharField(max_length=255, unique=True)),
                ("expires", models.DateTimeField()),
                ("scope", models.TextField(blank=True, default="write")),
                ("created", models.DateTimeField(auto_now_add=True)),
                ("updated", models.DateTimeField(auto_now=True)),
                ("description", models.TextField(blank=True, default="")),
                ("last_used", models.DateTimeField(default=None, editable=False, null=True)),
                ("modified", models.DateTimeField(auto_now=True, editable=False)),
                ("user", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE,
                                           related_name="main_oauth2accesstoken", to=settings.AUTH_USER_MODEL,
                                           help_text="The user representing the token owner")),
            ],
            options={"verbose_name": "access token", "ordering": ("id",), "abstract": False},
        ),
    ]
