"""The host service's own models that django-ansible-base builds on."""
from ansible_base.lib.abstract_models.common import CommonModel
from ansible_base.lib.abstract_models.organization import AbstractOrganization
from ansible_base.lib.abstract_models.team import AbstractTeam
from ansible_base.lib.abstract_models.user import AbstractDABUser


class User(AbstractDABUser, CommonModel):
    router_basename = "user"
    ignore_relations = ["groups", "user_permissions", "logentry", "social_auth", "authenticator_users",
                        "access_tokens", "applications", "oauth2refreshtoken"]

    class Meta(AbstractDABUser.Meta):
        ordering = ("id",)


class Organization(AbstractOrganization):
    router_basename = "organization"


class Team(AbstractTeam):
    router_basename = "team"
