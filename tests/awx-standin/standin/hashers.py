"""Django's default password hasher, with its cost taken from the runtime settings."""
from django.contrib.auth.hashers import PBKDF2PasswordHasher


class StandinPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """Django 4.2's PBKDF2PasswordHasher (same algorithm name, same hashes) whose iterations are
    the runtime setting password_hash_iterations: by default Django's 600000, which AWX and the
    gateway use. As in Django, a hash of another cost is re-made at this cost on the next login."""

    @property
    def iterations(self):
        from .runtime import rt_settings
        return int(rt_settings()["password_hash_iterations"])
