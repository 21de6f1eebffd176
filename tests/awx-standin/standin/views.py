"""AWX 24.6.1 endpoints (modes awx and generic; the gateway mode runs django-ansible-base: ../gateway)."""
import base64
import binascii
import json
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.db import transaction
from django.http import HttpResponse, HttpResponseNotAllowed
from django.core.paginator import Paginator as DjangoPaginator
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider.models import get_access_token_model, get_application_model, get_refresh_token_model
from oauthlib import oauth2
from oauthlib.common import generate_token
from rest_framework.exceptions import APIException
from rest_framework.filters import SearchFilter
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request as DRFRequest
from rest_framework.utils.urls import replace_query_param

from ansible_base.rest_filters.rest_framework.field_lookup_backend import FieldLookupBackend
from ansible_base.rest_filters.rest_framework.order_backend import OrderByBackend
from ansible_base.rest_filters.rest_framework.type_filter_backend import TypeFilterBackend

from .models import external_provider
from .runtime import core, rt_settings

User = get_user_model()
AccessToken, Application, RefreshToken = get_access_token_model(), get_application_model(), get_refresh_token_model()
API = "/api/v2/"
MASK = "************"
SAFE = ("GET", "HEAD", "OPTIONS")
ALLOWED_SCOPES = ["read", "write"]
LOGIN_HINT = " To establish a login session, visit /api/login/."


def ts(dt):
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if dt else None


def jresp(data, status=200, headers=None):
    """DRF's JSONRenderer output: compact JSON."""
    r = HttpResponse(json.dumps(data, separators=(",", ":"), ensure_ascii=False), status=status,
                     content_type="application/json")
    for k, v in (headers or {}).items():
        r[k] = v
    return r


def detail(msg, status):
    return jresp({"detail": msg}, status)


# ---------------------------------------------------------------- authentication

class Denied(Exception):
    def __init__(self, response):
        self.response = response


def unauthorized(message="Authentication credentials were not provided.", oauth2_error=None):
    # AWX awx/api/generics.py: fixed header, login hint appended to every 401.
    return jresp({"detail": message + LOGIN_HINT}, 401,
                 {"WWW-Authenticate": "Bearer realm=api authorization_url=/api/o/authorize/"})


def api_auth(request, anonymous=False):
    """Like AWX's DRF authentication classes: OAuth2 Bearer, then Basic. Returns (user, token).
    A bad Bearer token only counts where authentication is required (DOT's class returns None)."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, cred = header.partition(" ")
    if scheme.lower() == "bearer" and cred.strip():
        valid, r = core().verify_request(request, scopes=[])
        if valid and r.user is not None and r.user.is_active:
            request._standin_user = r.user.username
            return r.user, r.access_token
        if anonymous:
            return None, None
        raise Denied(unauthorized(oauth2_error=getattr(r, "oauth2_error", None)))
    if scheme.lower() == "basic":
        try:
            username, sep, password = base64.b64decode(cred.strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Denied(unauthorized("Invalid basic header. Credentials not correctly base64 encoded."))
        if not sep:
            raise Denied(unauthorized("Invalid basic header. No credentials provided."))
        request._standin_user = username
        user = authenticate(request, username=username, password=password)
        if user is None or not user.is_active:
            raise Denied(unauthorized("Invalid username/password."))
        return user, None
    raise Denied(unauthorized())


def api_view(methods, anonymous=False):
    """Auth (401), read-scope check (403), then method check (405), like DRF's dispatch."""
    def deco(fn):
        @csrf_exempt
        def view(request, *args, **kwargs):
            try:
                user, token = (None, None)
                if not anonymous or request.META.get("HTTP_AUTHORIZATION"):
                    user, token = api_auth(request, anonymous)
                if token is not None and request.method not in SAFE and "write" not in token.scope.split():
                    return detail("You do not have permission to perform this action.", 403)
                if request.method not in methods and request.method not in ("HEAD", "OPTIONS"):
                    return detail('Method "%s" not allowed.' % request.method, 405)
                return fn(request, user, token, *args, **kwargs)
            except Denied as d:
                return d.response
        return view
    return deco


def json_body(request):
    """DRF with AWX's JSONParser only: empty body -> {}; other media types -> 415."""
    if not request.body:
        return {}
    ctype = request.META.get("CONTENT_TYPE", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise Denied(detail('Unsupported media type "%s" in request.' % ctype, 415))
    try:
        return json.loads(request.body.decode("utf-8"))
    except ValueError as e:
        raise Denied(detail("JSON parse error - %s" % e, 400))


class DisabledPaginator(DjangoPaginator):
    """?count_disabled: one page, no count (AWX)."""

    @property
    def num_pages(self):
        return 1

    @property
    def count(self):
        return 200


class Pagination(PageNumberPagination):
    """AWX 24.6.1's list pagination: ?page_size= (default 25, at most MAX_PAGE_SIZE 200), links
    built from the request's path and query (not absolute), ?count_disabled."""
    page_size = 25
    page_size_query_param = "page_size"
    max_page_size = settings.MAX_PAGE_SIZE
    count_disabled = False

    def get_next_link(self):
        if not self.page.has_next():
            return None
        return replace_query_param(self.cap_page_size(self.request.get_full_path()), self.page_query_param,
                                   self.page.next_page_number())

    def get_previous_link(self):
        if not self.page.has_previous():
            return None
        return replace_query_param(self.cap_page_size(self.request.get_full_path()), self.page_query_param,
                                   self.page.previous_page_number())

    def cap_page_size(self, url):
        # int() of a non-number raises here as in AWX (a 500 for ?page_size=x when there is a next page)
        if int(self.request.query_params.get(self.page_size_query_param, 0)) > self.max_page_size:
            url = replace_query_param(url, self.page_size_query_param, self.max_page_size)
        return url

    def paginate_queryset(self, queryset, request, view=None):
        self.count_disabled = "count_disabled" in request.query_params
        self.django_paginator_class = DisabledPaginator if self.count_disabled else DjangoPaginator
        return super().paginate_queryset(queryset, request, view)

    def answer(self, data):
        if self.count_disabled:
            return {"results": data}
        return self.get_paginated_response(data).data


class ListView:
    """What AWX's list views give the filter backends: its model's search fields, no extra ordering."""
    search_fields = ("description",)
    ordering = None


# AWX 24.6.1's DEFAULT_FILTER_BACKENDS (django-ansible-base's, set by its dynamic settings).
FILTER_BACKENDS = (TypeFilterBackend, FieldLookupBackend, SearchFilter, OrderByBackend)


def token_list(request, qs):
    """A filtered, ordered, paginated token list; bad filters get AWX's 400 {"detail": ...}."""
    drf_request = DRFRequest(request)
    view = ListView()
    pager = Pagination()
    try:
        for backend in FILTER_BACKENDS:
            qs = backend().filter_queryset(drf_request, qs, view)
        page = pager.paginate_queryset(qs.select_related("user", "application"), drf_request, view)
    except APIException as e:
        return jresp({"detail": e.detail}, e.status_code)
    return jresp(pager.answer([token_obj(t) for t in page]))


# ---------------------------------------------------------------- serializers

def user_obj(u):
    ext = external_provider(u)
    return {"id": u.id, "type": "user", "url": "%susers/%d/" % (API, u.id),
            "related": {k: "%susers/%d/%s/" % (API, u.id, k) for k in
                        ("teams", "organizations", "admin_of_organizations", "projects", "credentials", "roles",
                         "activity_stream", "access_list", "tokens", "authorized_tokens", "personal_tokens")},
            "summary_fields": {"user_capabilities": {"edit": True, "delete": not u.is_superuser}},
            "created": ts(u.date_joined), "modified": ts(u.date_joined), "username": u.username,
            "first_name": u.first_name, "last_name": u.last_name, "email": u.email,
            "is_superuser": u.is_superuser, "is_system_auditor": False, "password": "$encrypted$",
            "ldap_dn": ("cn=%s,ou=users,dc=example,dc=org" % u.username) if ext == "ldap" else "",
            "last_login": ts(u.last_login), "external_account": ext or None}


def token_obj(at, plain=None, plain_refresh=None):
    """AWX's OAuth2TokenSerializer; the values only in the answer to the creating POST."""
    try:
        rt = at.refresh_token
    except RefreshToken.DoesNotExist:
        rt = None
    u = at.user
    related = {"user": "%susers/%d/" % (API, at.user_id)} if at.user_id else {}
    summary = {"user": {"id": u.id, "username": u.username, "first_name": u.first_name,
                        "last_name": u.last_name}} if u else {}
    if at.application_id:
        related["application"] = "%sapplications/%d/" % (API, at.application_id)
        summary["application"] = {"id": at.application_id, "name": at.application.name}
    related["activity_stream"] = "%stokens/%d/activity_stream/" % (API, at.id)
    return {"id": at.id, "type": "o_auth2_access_token", "url": "%stokens/%d/" % (API, at.id),
            "related": related, "summary_fields": summary, "created": ts(at.created), "modified": ts(at.modified),
            "description": at.description, "user": at.user_id, "token": plain or MASK,
            "refresh_token": None if rt is None else (plain_refresh or MASK),
            "application": at.application_id, "expires": ts(at.expires), "scope": at.scope}


# ---------------------------------------------------------------- /api/o/ (DOT views as AWX mounts them)

@csrf_exempt
def oauth_token(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST", "OPTIONS"])
    post = request.POST
    request._standin_grant = post.get("grant_type")
    if post.get("username"):
        request._standin_user = post.get("username")
    # AWX awx/api/views/oauth2_root.py: DOT never expires refresh tokens (DOT issue #746),
    # so AWX checks the age (from created) itself, before DOT sees the request.
    if post.get("grant_type") == "refresh_token" and post.get("refresh_token"):
        rt = RefreshToken.objects.filter(token=post["refresh_token"]).first()
        if rt and rt.created + timedelta(seconds=int(rt_settings()["refresh_token_expire_seconds"])) < timezone.now():
            return HttpResponse("The refresh token has expired.", status=403)
    try:
        url, headers, body, status = core().create_token_response(request)
    except oauth2.AccessDeniedError as e:
        return HttpResponse(str(e), status=403)
    # AWX only catches AccessDeniedError: any other OAuth2Error (e.g. for a query string) is a 500.
    r = HttpResponse(content=body, status=status)
    for k, v in headers.items():
        r[k] = v
    return r


@csrf_exempt
def oauth_revoke(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST", "OPTIONS"])
    url, headers, body, status = core().create_revocation_response(request)
    r = HttpResponse(content=body or "", status=status)
    for k, v in headers.items():
        r[k] = v
    return r


@api_view(["GET"], anonymous=True)
def oauth_root(request, user, token):
    return jresp({"authorize": "/api/o/authorize/", "token": "/api/o/token/", "revoke_token": "/api/o/revoke_token/"})


# ---------------------------------------------------------------- roots

@api_view(["GET"], anonymous=True)
def api_root(request, user, token):
    return jresp({"description": "AWX REST API", "current_version": "/api/v2/", "available_versions": {"v2": "/api/v2/"},
                  "oauth2": "/api/o/", "custom_logo": "", "custom_login_info": "", "login_redirect_override": ""})


@api_view(["GET"], anonymous=True)
def version_root(request, user, token):
    names = ["ping", "me", "users", "tokens", "applications", "config"]
    return jresp({n: "%s%s/" % (API, n) for n in names})


@api_view(["GET"], anonymous=True)
def ping(request, user, token):
    return jresp({"ha": False, "version": "24.6.1", "active_node": "awx-standin", "install_uuid": "00000000-0000-0000-0000-000000000000",
                  "instances": [], "instance_groups": []})


@api_view(["GET"])
def config(request, user, token):
    return jresp({"time_zone": "UTC", "license_info": {}, "version": "24.6.1", "eula": "", "analytics_status": "off",
                  "become_methods": []})


# ---------------------------------------------------------------- users and tokens

@api_view(["GET"])
def me(request, user, token):
    return jresp({"count": 1, "next": None, "previous": None, "results": [user_obj(user)]})


def find_user(ukey):
    """AWX named URLs: a user by id or by username."""
    qs = User.objects.filter(id=int(ukey)) if ukey.isdigit() else User.objects.filter(username=ukey)
    u = qs.first()
    if u is None:
        raise Denied(detail("Not found.", 404))
    return u


@api_view(["GET"])
def user_detail(request, user, token, ukey):
    return jresp(user_obj(find_user(ukey)))


def visible_tokens(user):
    """AWX OAuth2TokenAccess: a superuser sees every token, a user their own (and, as admin or
    auditor of an application's organization, its tokens: the stand-in has no organizations)."""
    return AccessToken.objects.all() if user.is_superuser else AccessToken.objects.filter(user=user)


def can_read_user(user, other):
    """AWX UserAccess: oneself, the superusers (and members of one's organizations: none here)."""
    return user.is_superuser or other.id == user.id or other.is_superuser


def create_token(request, user, application="body", app_required=False):
    """AWX BaseOAuth2TokenSerializer.create: always owned by the caller."""
    data = json_body(request)
    if not isinstance(data, dict):
        return detail("Invalid data. Expected a dictionary, but got %s." % type(data).__name__, 400)
    errors = {}
    scope = data.get("scope", "write")
    words = scope.split() if isinstance(scope, str) else []
    if not words or any(w not in ALLOWED_SCOPES or words.count(w) > 1 for w in words):
        errors["scope"] = ["Must be a simple space-separated string with allowed scopes %s." % ALLOWED_SCOPES]
    description = data.get("description", "")
    if not isinstance(description, str):
        errors["description"] = ["Not a valid string."]
    app = None
    app_id = data.get("application") if application == "body" else application
    if app_id is not None:
        if isinstance(app_id, bool) or not isinstance(app_id, (int, str)) or not str(app_id).isdigit():
            errors["application"] = ["Incorrect type. Expected pk value, received %s." % type(app_id).__name__]
        else:
            app = Application.objects.filter(id=int(app_id)).first()
            if app is None:
                errors["application"] = ['Invalid pk "%s" - object does not exist.' % app_id]
    elif app_required:
        errors["application"] = ["This field is required."]
    if errors:
        return jresp(errors, 400)
    expires = timezone.now() + timedelta(seconds=int(rt_settings()["access_token_expire_seconds"]))
    plain, plain_refresh = generate_token(), None
    try:
        with transaction.atomic():
            at = AccessToken.objects.create(user=user, token=plain, application=app, expires=expires,
                                            scope=" ".join(words), description=description)
            if app is not None:
                plain_refresh = generate_token()
                RefreshToken.objects.create(user=user, token=plain_refresh, application=app, access_token=at)
    except oauth2.AccessDeniedError as e:
        return detail(str(e), 403)
    at = AccessToken.objects.select_related("user", "application").get(id=at.id)
    return jresp(token_obj(at, plain, plain_refresh), 201, {"Location": "%stokens/%d/" % (API, at.id)})


@api_view(["GET", "POST"])
def tokens(request, user, token):
    if request.method == "POST":
        return create_token(request, user)
    return token_list(request, visible_tokens(user))


@api_view(["GET", "PUT", "PATCH", "DELETE"])
def token_detail(request, user, token, pk):
    at = AccessToken.objects.select_related("user", "application").filter(id=pk).first()
    if at is None:
        return detail("Not found.", 404)
    if not (user.is_superuser or at.user_id == user.id):
        return detail("You do not have permission to perform this action.", 403)
    if request.method == "DELETE":
        at.delete()  # the refresh token stays, with access_token NULL (AWX behaviour)
        return HttpResponse(status=204)
    if request.method in ("PUT", "PATCH"):
        data = json_body(request)
        if "scope" in data:
            words = data["scope"].split() if isinstance(data["scope"], str) else []
            if not words or any(w not in ALLOWED_SCOPES or words.count(w) > 1 for w in words):
                return jresp({"scope": ["Must be a simple space-separated string with allowed scopes %s." % ALLOWED_SCOPES]}, 400)
            at.scope = " ".join(words)
            at.save()
        if "description" in data:
            at.description = str(data["description"])
            at.save()
        at = AccessToken.objects.select_related("user", "application").get(id=pk)
    return jresp(token_obj(at))


def user_sublist(kind):
    @api_view(["GET", "POST"])
    def view(request, user, token, ukey):
        if request.method == "POST":
            find_user(ukey)
            # AWX creates the token for the caller, whoever the URL names.
            if kind == "personal_tokens":
                return create_token(request, user, application=None)
            return create_token(request, user, app_required=(kind == "authorized_tokens"))
        if kind == "tokens":
            # OAuth2UserTokenList: the URL's user (404, 403 unless readable), tokens the caller sees.
            owner = find_user(ukey)
            if not can_read_user(user, owner):
                return detail("You do not have permission to perform this action.", 403)
            return token_list(request, visible_tokens(user).filter(user=owner))
        # UserPersonalTokenList / UserAuthorizedTokenList list the *caller's* tokens, whoever
        # the URL names (their get_queryset never looks at it); a username must still resolve.
        if not ukey.isdigit():
            find_user(ukey)
        qs = AccessToken.objects.filter(user=user, application__isnull=(kind == "personal_tokens"))
        return token_list(request, qs)
    return view


@api_view(["GET"])
def applications(request, user, token):
    """AWX OAuth2ApplicationList (read-only here): the applications of the organizations the
    caller belongs to, every one for a superuser. The stand-in has no organizations: a user
    sees the applications created for them. The client secret is never listed."""
    qs = Application.objects.all() if user.is_superuser else Application.objects.filter(user=user)
    drf_request = DRFRequest(request)
    pager = Pagination()
    try:
        page = pager.paginate_queryset(qs.order_by("id"), drf_request, ListView())
    except APIException as e:
        return jresp({"detail": e.detail}, e.status_code)
    return jresp(pager.answer([{
        "id": a.id, "type": "o_auth2_application", "url": "%sapplications/%d/" % (API, a.id),
        "name": a.name, "description": "", "client_id": a.client_id,
        "client_type": a.client_type, "authorization_grant_type": a.authorization_grant_type,
        "redirect_uris": a.redirect_uris, "skip_authorization": a.skip_authorization,
        "created": ts(a.created), "modified": ts(a.updated),
    } for a in page]))


@api_view(["GET", "POST"])
def application_tokens(request, user, token, pk):
    if not Application.objects.filter(id=pk).exists():
        return detail("Not found.", 404)
    if request.method == "POST":
        return create_token(request, user, application=pk)
    return token_list(request, visible_tokens(user).filter(application_id=pk))


# ---------------------------------------------------------------- error pages

def not_found(request, exception=None):
    return detail("The requested resource could not be found.", 404)


def server_error(request):
    if request.path.startswith("/api/"):
        return detail("A server error has occurred.", 500)
    return HttpResponse("<h1>Server Error (500)</h1>", status=500)

