"""The test-control API under /_standin/, fault injection and the request log."""
import base64
import hashlib
import json
import os
import socket
import struct
import threading
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connection
from django.http import HttpResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider.models import get_access_token_model, get_application_model, get_refresh_token_model

from .models import sha256_of_stored
from .runtime import DEFAULTS, rt_settings, set_settings

if settings.MODE == "gateway":
    from gateway import glue as flavour  # django-ansible-base's models
else:
    from . import glue as flavour  # DOT's stock models and the stand-in's side tables

User = get_user_model()
AccessToken, Application, RefreshToken = get_access_token_model(), get_application_model(), get_refresh_token_model()


def jout(data, status=200):
    return HttpResponse(json.dumps(data), status=status, content_type="application/json")


def bad(msg, status=400):
    return jout({"error": msg}, status)


def ts(dt):
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if dt else None


# ---------------------------------------------------------------- request log

class RequestLog:
    """In memory, mirrored to RUN_DIR/requests.jsonl so that seq survives a restart."""

    def __init__(self, path):
        self.path, self.lock, self.entries, self.next_seq = path, threading.Lock(), [], 1
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue
                    if "seq_floor" in e:
                        self.entries, self.next_seq = [], max(self.next_seq, e["seq_floor"])
                    else:
                        self.entries.append(e)
                        self.next_seq = max(self.next_seq, e["seq"] + 1)

    def start(self, request, grant_type, user):
        with self.lock:
            e = {"seq": self.next_seq, "time": request.META.get("standin.arrived") or time.time(),
                 "method": request.method, "path": request.path,
                 "status": None, "grant_type": grant_type, "user": user, "error": None, "fault": None}
            self.next_seq += 1
            self.entries.append(e)
            return e

    def finish(self, e):
        with self.lock:
            with open(self.path, "a") as f:
                f.write(json.dumps(e) + "\n")

    def since(self, seq):
        with self.lock:
            return [dict(e) for e in self.entries if e["seq"] > seq]

    def clear(self):
        with self.lock:
            self.entries = []
            with open(self.path, "w") as f:
                f.write(json.dumps({"seq_floor": self.next_seq}) + "\n")


LOG = RequestLog(os.path.join(settings.RUN_DIR, "requests.jsonl"))


# ---------------------------------------------------------------- faults

# Before the request is processed (nothing is committed) ...
FAULT_MODES_BEFORE = ("status500", "html", "delay", "truncated", "reset", "hang")
# ... and after it was processed and its transaction committed.
FAULT_MODES_AFTER = ("delay_after", "cut_after_commit", "reset_after_commit")
FAULT_MODES = ("none",) + FAULT_MODES_BEFORE + FAULT_MODES_AFTER
STATUS500_PAGE = ('<!doctype html>\n<html lang="en">\n<head>\n  <title>Server Error (500)</title>\n</head>\n'
                  '<body>\n  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n')
LOGIN_PAGE = ('<!DOCTYPE html>\n<html><head><title>Log in | Single Sign-On</title></head>\n<body>\n'
              '<form method="post" action="/sso/login/"><input type="text" name="username">'
              '<input type="password" name="password"><button type="submit">Log in</button></form>\n'
              '</body></html>\n')
TRUNCATED_JSON = '{"access_token": "Qm7rT2vX9kLpA4sZ8nB1cD5eF3gH6j", "expires_in": 3153600'


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.state = {"mode": "none", "delay_seconds": 0.0, "paths": [], "count": None}

    def set(self, state):
        with self.lock:
            self.release.set()  # let requests hung by an earlier fault go (they are then reset)
            self.release = threading.Event()
            self.state = state

    def get(self):
        with self.lock:
            return dict(self.state)

    def take(self, path):
        """The fault for this request, or None; counts down `count`."""
        with self.lock:
            s = self.state
            if s["mode"] == "none":
                return None
            if s["paths"] and not any(path.startswith(p) for p in s["paths"]):
                return None
            f = dict(s, release=self.release)
            if s["count"] is not None:
                s["count"] -= 1
                if s["count"] <= 0:
                    self.state = {"mode": "none", "delay_seconds": 0.0, "paths": [], "count": None}
            return f


FAULTS = Faults()


def abort_connection(request):
    """Close the client connection without an answer (RST where the kernel allows)."""
    sock = request.META.get("gunicorn.socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def apply_fault(request, f):
    """A response for the fault, or None to answer normally. Aborted connections give a
    response too (gunicorn's write then fails quietly)."""
    mode = f["mode"]
    if mode == "delay":
        time.sleep(max(0.0, float(f["delay_seconds"])))
        return None
    if mode == "status500":
        return HttpResponse(STATUS500_PAGE, status=500, content_type="text/html")
    if mode == "html":
        return HttpResponse(LOGIN_PAGE, status=200, content_type="text/html; charset=utf-8")
    if mode == "truncated":
        return HttpResponse(TRUNCATED_JSON, status=200, content_type="application/json")
    if mode == "hang":
        f["release"].wait(3600)
    abort_connection(request)  # reset, or a hang that was released
    r = HttpResponse(b"", status=499)  # never reaches the client
    r._standin_aborted = True
    return r


# ---------------------------------------------------------------- middleware

def request_user_and_grant(request):
    grant, user = None, None
    try:
        if request.method == "POST" and request.path.endswith("o/token/"):
            grant = request.POST.get("grant_type")
            user = request.POST.get("username") or None
        else:
            scheme, _, cred = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() == "basic" and not request.path.endswith("o/revoke_token/"):
                user = base64.b64decode(cred.strip()).decode("utf-8").partition(":")[0] or None
    except Exception:
        pass
    return grant, user


def after_commit_fault(request, response, f):
    """The processed (committed) answer, delayed, cut or never sent."""
    mode = f["mode"]
    if mode == "delay_after":
        time.sleep(max(0.0, float(f["delay_seconds"])))
        return response
    if mode == "reset_after_commit":
        abort_connection(request)
        r = HttpResponse(b"", status=499)
        r._standin_aborted = True
        return r
    # cut_after_commit: the status line, the headers (with the full Content-Length) and half of
    # the body go out; then the connection is reset.
    content = b"" if response.streaming else response.content
    cut = StreamingHttpResponse(_cut_body(request, content), status=response.status_code)
    for k, v in response.items():
        cut[k] = v
    cut["Content-Length"] = str(len(content))
    cut._standin_aborted = True
    return cut


def _cut_body(request, content):
    if content[: len(content) // 2]:
        yield content[: len(content) // 2]
    time.sleep(0.05)  # let the part reach the client before the reset
    abort_connection(request)


def refresh_lock_key(request):
    """A refresh grant's refresh token as a PostgreSQL advisory-lock key, when uses of one refresh
    token are serialised (setting serialize_refresh_token_use), else None."""
    if request.method != "POST" or not request.path.endswith("o/token/"):
        return None
    try:
        if request.POST.get("grant_type") != "refresh_token" or not request.POST.get("refresh_token"):
            return None
    except Exception:
        return None
    if not rt_settings()["serialize_refresh_token_use"]:
        return None
    digest = hashlib.sha256(request.POST["refresh_token"].encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class StandinMiddleware:
    """Outermost: sees each request before and after its view's transaction (ATOMIC_REQUESTS)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def process(self, request):
        key = refresh_lock_key(request)
        if key is None:
            return self.get_response(request)
        # Session-level lock on the thread's connection, held until the view's transaction has
        # committed: a second use of the token then finds it revoked (invalid_grant).
        with connection.cursor() as c:
            c.execute("SELECT pg_advisory_lock(%s)", [key])
        try:
            return self.get_response(request)
        finally:
            with connection.cursor() as c:
                c.execute("SELECT pg_advisory_unlock(%s)", [key])

    def __call__(self, request):
        if request.path.startswith("/_standin/"):
            return self.get_response(request)
        grant, user = request_user_and_grant(request)
        entry = LOG.start(request, grant, user)
        fault = FAULTS.take(request.path)
        response = None
        if fault is not None:
            entry["fault"] = fault["mode"]
            if fault["mode"] in FAULT_MODES_BEFORE:
                response = apply_fault(request, fault)
        if response is None:
            response = self.process(request)
            # The status AWX answered (whatever reaches the client).
            entry["status"] = response.status_code
            entry["user"] = getattr(request, "_standin_user", None) or flavour.request_username(request) or entry["user"]
            if response.status_code >= 400 and response.get("Content-Type", "").startswith("application/json"):
                try:
                    err = json.loads(response.content).get("error")
                    entry["error"] = err if isinstance(err, str) else None
                except (ValueError, AttributeError):
                    pass
            if fault is not None and fault["mode"] in FAULT_MODES_AFTER:
                response = after_commit_fault(request, response, fault)
        elif not getattr(response, "_standin_aborted", False):
            entry["status"] = response.status_code
        LOG.finish(entry)
        return response


# ---------------------------------------------------------------- control views

def body(request):
    try:
        data = json.loads(request.body or b"{}")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def health(request):
    return jout({"status": "ok", "mode": settings.MODE, "pid": os.getpid(), "run_dir": settings.RUN_DIR})


@csrf_exempt
def users(request):
    if request.method == "GET":
        return jout({"users": [user_out(u) for u in User.objects.order_by("id")]})
    if request.method != "POST":
        return bad("method not allowed", 405)
    data = body(request)
    if not data or not isinstance(data.get("username"), str) or not data["username"]:
        return bad("username is required")
    ext = data.get("external", False)
    provider = "ldap" if ext is True else (ext if isinstance(ext, str) else "")
    u, created = User.objects.get_or_create(username=data["username"])
    if data.get("password"):
        u.set_password(data["password"])
    elif created:
        u.set_unusable_password()
    u.is_superuser = u.is_staff = bool(data.get("superuser", False))
    u.is_active = bool(data.get("active", True))
    u.save()
    flavour.set_external(u, provider)
    return jout(user_out(u), 201 if created else 200)


def user_out(u):
    return {"id": u.id, "username": u.username, "external": flavour.external_of(u) or False,
            "superuser": u.is_superuser, "active": u.is_active,
            # algorithm$iterations$salt$hash (no secret: a 600000-round PBKDF2 of a random test password)
            "password_hash": u.password}


GRANTS = {"password": Application.GRANT_PASSWORD, "authorization-code": Application.GRANT_AUTHORIZATION_CODE,
          "client-credentials": Application.GRANT_CLIENT_CREDENTIALS}


@csrf_exempt
def applications(request):
    if request.method == "GET":
        return jout({"applications": [app_out(a, flavour.known_secret(a)) for a in Application.objects.order_by("id")]})
    if request.method != "POST":
        return bad("method not allowed", 405)
    data = body(request)
    if not data or not isinstance(data.get("name"), str) or not data["name"]:
        return bad("name is required")
    ctype = data.get("client_type", "confidential")
    grant = data.get("grant_type", "password")
    if ctype not in ("confidential", "public"):
        return bad("client_type must be confidential or public")
    if grant not in GRANTS:
        return bad("grant_type must be password, authorization-code or client-credentials")
    if grant == "client-credentials" and settings.MODE != "generic":
        return bad("AWX and the gateway have no client-credentials applications (generic mode only)")
    owner = None
    if data.get("user"):
        owner = User.objects.filter(username=data["user"]).first()
        if owner is None:
            return bad("no such user: %s" % data["user"])
    elif grant == "client-credentials":
        return bad("user (the owner) is required for client-credentials")
    app = Application.objects.filter(name=data["name"]).first()
    created = app is None
    if created:
        app = Application(name=data["name"], redirect_uris="", skip_authorization=False)
    app.client_type, app.authorization_grant_type, app.user = ctype, GRANTS[grant], owner
    uris = data.get("redirect_uris", app.redirect_uris.split())
    if isinstance(uris, str):
        uris = uris.split()
    if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
        return bad("redirect_uris must be a list of URIs (or one space-separated string)")
    app.redirect_uris = " ".join(uris)
    if "skip_authorization" in data:
        app.skip_authorization = bool(data["skip_authorization"])
    try:
        # DOT's rules: an authorization-code app needs redirect URIs, each http or https.
        app.clean()
    except ValidationError as e:
        return bad("; ".join(e.messages))
    if data.get("client_id"):
        app.client_id = data["client_id"]
    secret = flavour.save_application(app, data.get("client_secret") or None, created)
    return jout(app_out(app, secret), 201 if created else 200)


def app_out(a, secret=None):
    """secret: the plain client secret, where it is known (the gateway keeps only a hash)."""
    public = a.client_type == "public"
    return {"id": a.id, "name": a.name, "client_id": a.client_id,
            "client_secret": None if public else secret,
            "client_type": a.client_type, "grant_type": a.authorization_grant_type,
            "redirect_uris": a.redirect_uris.split(), "skip_authorization": a.skip_authorization,
            "user": a.user.username if a.user_id else None}


def tokens(request):
    ats = AccessToken.objects.select_related("user", "application").filter(expires__gt=timezone.now())
    rts = RefreshToken.objects.select_related("user", "application")
    if request.GET.get("user"):
        ats, rts = ats.filter(user__username=request.GET["user"]), rts.filter(user__username=request.GET["user"])
    if request.GET.get("application"):
        ats = ats.filter(application__name=request.GET["application"])
        rts = rts.filter(application__name=request.GET["application"])
    refresh_age = int(rt_settings()["refresh_token_expire_seconds"])
    now = timezone.now()
    out_a = []
    for t in ats.order_by("id"):
        desc = flavour.description_of(t)
        out_a.append({"id": t.id, "user": t.user.username if t.user_id else None,
                      "application": t.application.name if t.application_id else None,
                      "description": desc, "scope": t.scope, "created": ts(t.created), "expires": ts(t.expires),
                      "sha256": sha256_of_stored(t.token)})
    out_r = [{"id": r.id, "user": r.user.username, "application": r.application.name, "created": ts(r.created),
              "revoked": r.revoked is not None,
              "expired": (now - r.created).total_seconds() > refresh_age,
              "access_token_id": r.access_token_id, "sha256": sha256_of_stored(r.token)}
             for r in rts.order_by("id")]
    return jout({"access_tokens": out_a, "refresh_tokens": out_r})


@csrf_exempt
def settings_view(request):
    if request.method == "PUT":
        data = body(request)
        if data is None:
            return bad("JSON object expected")
        for k, v in data.items():
            if k not in DEFAULTS:
                return bad("unknown setting %s" % k)
            if k.endswith("_seconds") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                return bad("%s must be an integer >= 0" % k)
            if k.endswith("_iterations") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                return bad("%s must be an integer >= 1" % k)
            if (k.startswith("allow_") or k.startswith("serialize_")) and not isinstance(v, bool):
                return bad("%s must be a boolean" % k)
        set_settings(data)
    elif request.method == "DELETE":
        set_settings(DEFAULTS)
    elif request.method != "GET":
        return bad("method not allowed", 405)
    return jout(rt_settings())


@csrf_exempt
def faults_view(request):
    if request.method == "PUT":
        data = body(request)
        if data is None or data.get("mode", "none") not in FAULT_MODES:
            return bad("mode must be one of %s" % ", ".join(FAULT_MODES))
        paths = data.get("paths") or []
        count = data.get("count")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return bad("paths must be a list of path prefixes")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            return bad("count must be an integer >= 1")
        try:
            delay = float(data.get("delay_seconds", 0))
        except (TypeError, ValueError):
            return bad("delay_seconds must be a number")
        FAULTS.set({"mode": data.get("mode", "none"), "delay_seconds": delay, "paths": paths, "count": count})
    elif request.method == "DELETE":
        FAULTS.set({"mode": "none", "delay_seconds": 0.0, "paths": [], "count": None})
    elif request.method != "GET":
        return bad("method not allowed", 405)
    return jout(FAULTS.get())


@csrf_exempt
def requests_view(request):
    if request.method == "DELETE":
        LOG.clear()
        return jout({"requests": []})
    if request.method != "GET":
        return bad("method not allowed", 405)
    try:
        since = int(request.GET.get("since", 0))
    except ValueError:
        return bad("since must be an integer")
    return jout({"requests": LOG.since(since)})
