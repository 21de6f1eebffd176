import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("main", "0001_initial"), ("oauth2_provider", "0005_auto_20211222_2352")]

    operations = [
        migrations.AddField(
            model_name="oauth2accesstoken", name="application",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE,
                                    to=settings.OAUTH2_PROVIDER_APPLICATION_MODEL)),
        migrations.AddField(
            model_name="oauth2accesstoken", name="id_token",
            field=models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE,
                                       related_name="access_token", to=settings.OAUTH2_PROVIDER_ID_TOKEN_MODEL)),
        migrations.AddField(
            model_name="oauth2accesstoken", name="source_refresh_token",
            field=models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                       related_name="refreshed_access_token",
                                       to=settings.OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL)),
    ]
