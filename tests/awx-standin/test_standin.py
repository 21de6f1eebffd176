"""Tests of the AWX stand-in against AWX_PROTOCOL.md.

Run: tests/awx-standin/standin.sh test [-x -q ...]
Servers: STANDIN_URL (any mode, found from /_standin/health) or STANDIN_AWX_URL,
STANDIN_GATEWAY_URL, STANDIN_GENERIC_URL; every mode not given is started with standin.sh.
"""
import base64
import datetime
import email.utils
import hashlib
import html.parser
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
SH = os.path.join(HERE, "standin.sh")
AWX_401 = {"detail": "Authentication credentials were not provided. To establish a login session, visit /api/login/."}
AWX_WWW = "Bearer realm=api authorization_url=/api/o/authorize/"
EXTERNAL = ("(access_denied) OAuth2 Tokens cannot be created by users associated with an "
            "external authentication provider (ldap)")


def sha(v):
    return hashlib.sha256(v.encode()).hexdigest()


def uniq(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def start(run_dir, mode, *extra):
    out = subprocess.run([SH, "start", str(run_dir), "--mode", mode, *extra], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=600)
    return out.stdout.strip().splitlines()[-1]


def stop(run_dir):
    subprocess.run([SH, "stop", str(run_dir)], check=True, timeout=60)


class Server:
    def __init__(self, url, mode, run_dir=None):
        self.url, self.mode, self.run_dir = url.rstrip("/"), mode, run_dir
        self.token_path = "/o/token/" if mode == "gateway" else "/api/o/token/"
        self.revoke_path = "/o/revoke_token/" if mode == "gateway" else "/api/o/revoke_token/"
        self.api = "/api/gateway/v1/" if mode == "gateway" else "/api/v2/"
        self.ok = 201 if mode == "gateway" else 200

    def ctl(self, method, path, payload=None, **kw):
        r = requests.request(method, self.url + "/_standin/" + path, json=payload, timeout=30, **kw)
        assert r.status_code < 300, r.text
        return r.json()

    def get(self, path, **kw):
        kw.setdefault("timeout", 30)
        return requests.get(self.url + path, **kw)

    def post(self, path, **kw):
        kw.setdefault("timeout", 30)
        return requests.post(self.url + path, **kw)

    def delete(self, path, **kw):
        kw.setdefault("timeout", 30)
        return requests.delete(self.url + path, **kw)

    def user(self, external=False, superuser=False):
        name, pw = uniq("user"), uniq("pw")
        self.ctl("POST", "users", {"username": name, "password": pw, "external": external, "superuser": superuser})
        return name, pw

    def app(self, grant="password", client_type="confidential", owner=None):
        out = self.ctl("POST", "applications", {"name": uniq("app"), "client_type": client_type,
                                                 "grant_type": grant, "user": owner})
        return out

    def password_grant(self, app, user, pw, timeout=30, **extra):
        data = {"grant_type": "password", "username": user, "password": pw, **extra}
        return self.post(self.token_path, data=data, auth=(app["client_id"], app["client_secret"]), timeout=timeout)

    def refresh(self, app, refresh_token):
        return self.post(self.token_path, data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                         auth=(app["client_id"], app["client_secret"]))

    def me(self, token):
        return self.get(self.api + "me/", headers={"Authorization": "Bearer " + token})

    def live(self, **params):
        return self.ctl("GET", "tokens", params=params)


def _server(mode, tmp_path_factory):
    url = os.environ.get("STANDIN_%s_URL" % mode.upper())
    if not url and os.environ.get("STANDIN_URL"):
        any_url = os.environ["STANDIN_URL"].rstrip("/")
        if requests.get(any_url + "/_standin/health", timeout=10).json()["mode"] == mode:
            url = any_url
    if url:
        return Server(url, mode), None
    run = tmp_path_factory.mktemp("standin-" + mode)
    return Server(start(run, mode), mode, run), run


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    made, started = {}, []

    def get(mode):
        if mode not in made:
            made[mode], run = _server(mode, tmp_path_factory)
            if run is not None:
                started.append(run)
        return made[mode]
    yield get
    for run in started:
        stop(run)


@pytest.fixture
def awx(servers):
    s = servers("awx")
    yield s
    s.ctl("DELETE", "faults")
    s.ctl("DELETE", "settings")


@pytest.fixture
def gw(servers):
    s = servers("gateway")
    yield s
    s.ctl("DELETE", "faults")
    s.ctl("DELETE", "settings")


@pytest.fixture
def generic(servers):
    s = servers("generic")
    yield s
    s.ctl("DELETE", "faults")
    s.ctl("DELETE", "settings")


@pytest.fixture
def setup(awx):
    """A user, a confidential password app and a password-grant token on the awx server."""
    user, pw = awx.user()
    app = awx.app()
    r = awx.password_grant(app, user, pw)
    assert r.status_code == 200, r.text
    return dict(user=user, pw=pw, app=app, tok=r.json())


# ---------------------------------------------------------------- /api/o/token/

def test_password_grant_and_me(awx, setup):
    r = awx.password_grant(setup["app"], setup["user"], setup["pw"])
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store" and r.headers["Pragma"] == "no-cache"
    assert r.headers["Content-Type"] == "application/json"
    t = r.json()
    assert set(t) == {"access_token", "expires_in", "token_type", "scope", "refresh_token"}
    assert t["token_type"] == "Bearer" and t["expires_in"] == 31536000000 and t["scope"] == "read write"
    assert len(t["access_token"]) == 30 and t["access_token"].isalnum()
    me = awx.me(t["access_token"])
    assert me.status_code == 200
    body = me.json()
    assert body["count"] == 1 and body["results"][0]["username"] == setup["user"]
    assert body["results"][0]["type"] == "user"
    # scope given explicitly, read-only
    r = awx.password_grant(setup["app"], setup["user"], setup["pw"], scope="read")
    assert r.status_code == 200 and r.json()["scope"] == "read"


def test_api_roots(awx, gw):
    assert awx.get("/api/").json()["oauth2"] == "/api/o/"
    assert awx.get("/api/o/").json() == {"authorize": "/api/o/authorize/", "token": "/api/o/token/",
                                         "revoke_token": "/api/o/revoke_token/"}
    assert awx.get("/api/gateway/v1/").status_code == 404
    assert gw.get("/api/gateway/v1/").status_code == 200
    assert gw.get("/api/o/").status_code == 404
    assert gw.post("/api/o/token/", data={"grant_type": "password"}).status_code == 404
    assert awx.get("/api/o/token/").status_code == 405


def test_json_body_gives_unsupported_grant_type(awx, setup):
    app = setup["app"]
    r = awx.post("/api/o/token/", json={"grant_type": "password", "username": setup["user"], "password": setup["pw"]},
                 auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 400 and r.json() == {"error": "unsupported_grant_type"}


def test_query_string_gives_500(awx, setup):
    app = setup["app"]
    r = awx.post("/api/o/token/?scope=write", data={"grant_type": "password", "username": setup["user"],
                                                      "password": setup["pw"]},
                 auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 500


def test_bad_client(awx, setup):
    app = setup["app"]
    for auth in [(app["client_id"], "wrong"), ("nope", "nope"), (setup["user"], setup["pw"])]:
        r = awx.post("/api/o/token/", data={"grant_type": "password", "username": setup["user"],
                                            "password": setup["pw"]}, auth=auth)
        assert r.status_code == 401
        assert r.json() == {"error": "invalid_client"}
        assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_client"'
    # client credentials in the form work too
    r = awx.post("/api/o/token/", data={"grant_type": "password", "username": setup["user"], "password": setup["pw"],
                                        "client_id": app["client_id"], "client_secret": app["client_secret"]})
    assert r.status_code == 200


def test_public_client(awx):
    user, pw = awx.user()
    app = awx.app(client_type="public")
    assert app["client_secret"] is None
    r = awx.post("/api/o/token/", data={"grant_type": "password", "username": user, "password": pw,
                                        "client_id": app["client_id"]})
    assert r.status_code == 200


def test_wrong_password_and_missing_parameter(awx, setup):
    r = awx.password_grant(setup["app"], setup["user"], "wrong")
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_grant", "error_description": "Invalid credentials given."}
    app = setup["app"]
    r = awx.post("/api/o/token/", data={"grant_type": "password", "username": setup["user"]},
                 auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_request", "error_description": "Request is missing password parameter."}
    r = awx.password_grant(setup["app"], setup["user"], setup["pw"], scope="admin")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    r = awx.password_grant(setup["app"], setup["user"], setup["pw"], grant_type="magic")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_client_credentials_refused_by_awx_and_gateway(awx, gw):
    for s in (awx, gw):
        app = s.app()
        r = s.post(s.token_path, data={"grant_type": "client_credentials"}, auth=(app["client_id"], app["client_secret"]))
        assert r.status_code == 400 and r.json() == {"error": "unauthorized_client"}
        user, _ = s.user()
        r = requests.post(s.url + "/_standin/applications", json={"name": uniq("cc"), "client_type": "confidential",
                                                                  "grant_type": "client-credentials", "user": user})
        assert r.status_code == 400


def test_generic_client_credentials(generic):
    owner, pw = generic.user()
    app = generic.app(grant="client-credentials", owner=owner)
    r = generic.post("/api/o/token/", data={"grant_type": "client_credentials"},
                     auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 200, r.text
    t = r.json()
    assert "refresh_token" not in t and t["scope"] == "read write"
    me = generic.me(t["access_token"])
    assert me.status_code == 200 and me.json()["results"][0]["username"] == owner
    live = generic.live(user=owner)["access_tokens"]
    assert [a["sha256"] for a in live] == [sha(t["access_token"])]
    # password apps work as on AWX
    papp = generic.app()
    assert generic.password_grant(papp, owner, pw).status_code == 200


# ---------------------------------------------------------------- refresh

def test_refresh_rotation(awx, setup):
    app, tok = setup["app"], setup["tok"]
    awx.ctl("DELETE", "requests")
    r = awx.refresh(app, tok["refresh_token"])
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    new = r.json()
    assert new["access_token"] != tok["access_token"] and new["refresh_token"] != tok["refresh_token"]
    assert new["scope"] == "read write"
    old = awx.me(tok["access_token"])
    assert old.status_code == 401 and old.json() == AWX_401 and old.headers["WWW-Authenticate"] == AWX_WWW
    assert awx.me(new["access_token"]).status_code == 200
    again = awx.refresh(app, tok["refresh_token"])
    assert again.status_code == 400 and again.json() == {"error": "invalid_grant"}
    log = awx.ctl("GET", "requests")["requests"]
    assert [(e["grant_type"], e["status"], e["error"]) for e in log if e["path"] == "/api/o/token/"] == [
        ("refresh_token", 200, None), ("refresh_token", 400, "invalid_grant")]
    live = awx.live(user=setup["user"])
    assert [a["sha256"] for a in live["access_tokens"]] == [sha(new["access_token"])]
    rts = {r["sha256"]: r for r in live["refresh_tokens"]}
    assert rts[sha(tok["refresh_token"])]["revoked"] is True
    assert rts[sha(new["refresh_token"])]["revoked"] is False
    # narrowing the scope works, widening does not
    r = awx.post("/api/o/token/", data={"grant_type": "refresh_token", "refresh_token": new["refresh_token"],
                                        "scope": "read"}, auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 200 and r.json()["scope"] == "read"
    r = awx.post("/api/o/token/", data={"grant_type": "refresh_token", "refresh_token": r.json()["refresh_token"],
                                        "scope": "read write"}, auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"


def test_refresh_needs_the_same_client(awx, setup):
    other = awx.app()
    r = awx.refresh(other, setup["tok"]["refresh_token"])
    assert r.status_code == 400 and r.json() == {"error": "invalid_grant"}
    r = awx.post("/api/o/token/", data={"grant_type": "refresh_token", "refresh_token": setup["tok"]["refresh_token"]})
    assert r.status_code == 401 and r.json() == {"error": "invalid_client"}


def test_concurrent_refresh_only_one_wins(awx, setup):
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: awx.refresh(setup["app"], setup["tok"]["refresh_token"]), range(8)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [400] * 7
    assert all(r.json() == {"error": "invalid_grant"} for r in results if r.status_code == 400)


def test_refresh_token_expiry(awx, setup):
    awx.ctl("PUT", "settings", {"refresh_token_expire_seconds": 1})
    time.sleep(2.1)
    r = awx.refresh(setup["app"], setup["tok"]["refresh_token"])
    assert r.status_code == 403
    assert r.headers["Content-Type"].startswith("text/html")
    assert r.text == "The refresh token has expired."
    # the access token itself lives on
    assert awx.me(setup["tok"]["access_token"]).status_code == 200


def test_access_token_expiry(awx, setup):
    awx.ctl("PUT", "settings", {"access_token_expire_seconds": 1})
    r = awx.password_grant(setup["app"], setup["user"], setup["pw"])
    assert r.status_code == 200 and r.json()["expires_in"] == 1
    t = r.json()["access_token"]
    time.sleep(1.2)
    r = awx.me(t)
    assert r.status_code == 401 and r.json() == AWX_401 and r.headers["WWW-Authenticate"] == AWX_WWW
    assert sha(t) not in [a["sha256"] for a in awx.live(user=setup["user"])["access_tokens"]]


def test_delete_leaves_refresh_token_which_then_gives_500(awx, setup):
    tok = setup["tok"]
    listed = awx.get("/api/v2/tokens/", auth=(setup["user"], setup["pw"])).json()["results"]
    tid = listed[0]["id"]
    assert awx.delete("/api/v2/tokens/%d/" % tid, auth=(setup["user"], setup["pw"])).status_code == 204
    assert awx.me(tok["access_token"]).status_code == 401
    rts = awx.live(user=setup["user"])["refresh_tokens"]
    assert rts[0]["revoked"] is False and rts[0]["access_token_id"] is None
    assert awx.refresh(setup["app"], tok["refresh_token"]).status_code == 500


# ---------------------------------------------------------------- external users

def test_external_user_refused(awx):
    user, pw = awx.user(external=True)
    app = awx.app()
    r = awx.password_grant(app, user, pw)
    assert r.status_code == 403 and r.headers["Content-Type"].startswith("text/html")
    assert r.text == EXTERNAL
    r = awx.post("/api/v2/tokens/", json={}, auth=(user, pw))
    assert r.status_code == 403 and r.json() == {"detail": EXTERNAL}
    r = awx.post("/api/v2/users/%s/personal_tokens/" % user, json={}, auth=(user, pw))
    assert r.status_code == 403
    assert awx.live(user=user)["access_tokens"] == []
    # Basic auth itself works for them (AWX's LDAP backend)
    me = awx.get("/api/v2/me/", auth=(user, pw)).json()["results"][0]
    assert me["external_account"] == "ldap"


# ---------------------------------------------------------------- REST tokens

def test_personal_token_lifecycle(awx):
    user, pw = awx.user()
    r = awx.post("/api/v2/users/%s/personal_tokens/" % user, json={"description": "AwxToken ns/a"}, auth=(user, pw))
    assert r.status_code == 201, r.text
    t = r.json()
    assert r.headers["Location"] == "/api/v2/tokens/%d/" % t["id"]
    for k in ("id", "type", "url", "related", "summary_fields", "created", "modified", "description", "user",
              "token", "refresh_token", "application", "expires", "scope"):
        assert k in t
    assert t["type"] == "o_auth2_access_token" and t["scope"] == "write" and t["application"] is None
    assert t["refresh_token"] is None and len(t["token"]) == 30 and t["description"] == "AwxToken ns/a"
    assert t["summary_fields"]["user"]["username"] == user and "application" not in t["related"]
    assert t["expires"].startswith("3") and t["expires"].endswith("Z")
    g = awx.get("/api/v2/tokens/%d/" % t["id"], auth=(user, pw)).json()
    assert g["token"] == "************" and g["refresh_token"] is None
    lst = awx.get("/api/v2/users/%s/personal_tokens/" % user, auth=(user, pw)).json()
    assert lst["count"] == 1 and lst["results"][0]["token"] == "************"
    assert awx.me(t["token"]).json()["results"][0]["username"] == user
    assert awx.delete("/api/v2/tokens/%d/" % t["id"], auth=(user, pw)).status_code == 204
    r = awx.me(t["token"])
    assert r.status_code == 401 and r.json() == AWX_401
    assert awx.get("/api/v2/tokens/%d/" % t["id"], auth=(user, pw)).status_code == 404


def test_rest_tokens_rules(awx, setup):
    user, pw = setup["user"], setup["pw"]
    # form body -> 415
    r = awx.post("/api/v2/tokens/", data={"description": "x"}, auth=(user, pw))
    assert r.status_code == 415
    # bad credentials -> AWX's 401
    r = awx.post("/api/v2/tokens/", json={}, auth=(user, "wrong"))
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == AWX_WWW
    r = awx.get("/api/v2/tokens/")
    assert r.status_code == 401 and r.json() == AWX_401
    # bad scope -> 400
    assert awx.post("/api/v2/tokens/", json={"scope": "read read"}, auth=(user, pw)).status_code == 400
    # a read token: GET yes, create no, delete itself no
    rd = awx.post("/api/v2/tokens/", json={"scope": "read"}, auth=(user, pw)).json()
    hdr = {"Authorization": "Bearer " + rd["token"]}
    assert awx.get("/api/v2/me/", headers=hdr).status_code == 200
    r = awx.post("/api/v2/tokens/", json={}, headers=hdr)
    assert r.status_code == 403 and r.json() == {"detail": "You do not have permission to perform this action."}
    assert awx.delete("/api/v2/tokens/%d/" % rd["id"], headers=hdr).status_code == 403
    # the password-grant token ("read write") can create, and a write token can delete itself
    wr = awx.post("/api/v2/tokens/", json={}, headers={"Authorization": "Bearer " + setup["tok"]["access_token"]})
    assert wr.status_code == 201
    hdr = {"Authorization": "Bearer " + wr.json()["token"]}
    assert awx.delete("/api/v2/tokens/%d/" % wr.json()["id"], headers=hdr).status_code == 204
    assert awx.me(wr.json()["token"]).status_code == 401
    # someone else's token: not deletable; a superuser may
    other, opw = awx.user()
    assert awx.delete("/api/v2/tokens/%d/" % rd["id"], auth=(other, opw)).status_code == 403
    admin, apw = awx.user(superuser=True)
    assert awx.delete("/api/v2/tokens/%d/" % rd["id"], auth=(admin, apw)).status_code == 204
    # posting to another user's personal_tokens creates a token owned by the caller
    r = awx.post("/api/v2/users/%s/personal_tokens/" % other, json={}, auth=(user, pw))
    assert r.status_code == 201 and r.json()["summary_fields"]["user"]["username"] == user


def test_application_token_via_rest(awx, setup):
    user, pw, app = setup["user"], setup["pw"], setup["app"]
    r = awx.post("/api/v2/tokens/", json={"application": app["id"], "scope": "read"}, auth=(user, pw))
    assert r.status_code == 201
    t = r.json()
    assert len(t["refresh_token"]) == 30 and t["application"] == app["id"]
    g = awx.get("/api/v2/tokens/%d/" % t["id"], auth=(user, pw)).json()
    assert g["token"] == "************" and g["refresh_token"] == "************"
    r = awx.refresh(app, t["refresh_token"])
    assert r.status_code == 200 and r.json()["scope"] == "read"
    assert awx.post("/api/v2/tokens/", json={"application": 99999}, auth=(user, pw)).status_code == 400


def test_list_is_paginated(awx):
    user, pw = awx.user()
    for _ in range(3):
        awx.post("/api/v2/tokens/", json={}, auth=(user, pw))
    r = awx.get("/api/v2/tokens/?page_size=2", auth=(user, pw)).json()
    assert r["count"] == 3 and len(r["results"]) == 2 and r["previous"] is None and "page=2" in r["next"]
    r2 = awx.get(r["next"], auth=(user, pw)).json()
    assert len(r2["results"]) == 1 and r2["next"] is None


# ---------------------------------------------------------------- revoke_token

def test_revoke_token(awx, setup):
    app, tok = setup["app"], setup["tok"]
    creds = (app["client_id"], app["client_secret"])
    r = awx.post("/api/o/revoke_token/", data={"token": tok["access_token"]},
                 headers={"Authorization": "Bearer " + tok["access_token"]})
    assert r.status_code == 401 and r.json() == {"error": "invalid_client"}
    r = awx.post("/api/o/revoke_token/", json={"token": tok["access_token"]}, auth=creds)
    assert r.status_code == 400 and r.json() == {"error": "invalid_request", "error_description": "Missing token parameter."}
    r = awx.post("/api/o/revoke_token/", data={"token": "unknown"}, auth=creds)
    assert r.status_code == 200 and r.content == b""
    # revoking the refresh token kills its access token
    r = awx.post("/api/o/revoke_token/", data={"token": tok["refresh_token"], "token_type_hint": "refresh_token"},
                 auth=creds)
    assert r.status_code == 200 and r.content == b""
    assert awx.me(tok["access_token"]).status_code == 401
    assert awx.refresh(app, tok["refresh_token"]).json() == {"error": "invalid_grant"}
    # an access token (by form credentials), and a PAT with any app's credentials
    t2 = awx.password_grant(app, setup["user"], setup["pw"]).json()
    r = awx.post("/api/o/revoke_token/", data={"token": t2["access_token"], "client_id": app["client_id"],
                                               "client_secret": app["client_secret"]})
    assert r.status_code == 200 and awx.me(t2["access_token"]).status_code == 401
    pat = awx.post("/api/v2/tokens/", json={}, auth=(setup["user"], setup["pw"])).json()
    assert awx.post("/api/o/revoke_token/", data={"token": pat["token"]}, auth=creds).status_code == 200
    assert awx.me(pat["token"]).status_code == 401
    assert awx.live(user=setup["user"])["access_tokens"] == []


# ---------------------------------------------------------------- gateway

def test_gateway(gw):
    user, pw = gw.user()
    app = gw.app()
    r = gw.password_grant(app, user, pw)
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["expires_in"] == 31536000 and r.headers["Cache-Control"] == "no-store"
    me = gw.me(t["access_token"])
    assert me.status_code == 200 and me.json()["results"][0]["username"] == user
    r = gw.refresh(app, t["refresh_token"])
    assert r.status_code == 201
    t2 = r.json()
    dead = gw.me(t["access_token"])
    assert dead.status_code == 401
    assert dead.headers["WWW-Authenticate"].startswith('Bearer realm="api",error="invalid_token"')
    assert gw.refresh(app, t["refresh_token"]).json() == {"error": "invalid_grant"}
    # revoking with the plain token is a 200 that revokes nothing; the stored hash form works
    creds = (app["client_id"], app["client_secret"])
    r = gw.post("/o/revoke_token/", data={"token": t2["access_token"]}, auth=creds)
    assert r.status_code == 200 and gw.me(t2["access_token"]).status_code == 200
    r = gw.post("/o/revoke_token/", data={"token": "$sha256$" + sha(t2["access_token"])}, auth=creds)
    assert r.status_code == 200 and gw.me(t2["access_token"]).status_code == 401
    # the refresh token too, by its hash
    r = gw.post("/o/revoke_token/", data={"token": "$sha256$" + sha(t2["refresh_token"])}, auth=creds)
    assert gw.refresh(app, t2["refresh_token"]).status_code == 400
    # personal tokens over REST
    r = gw.post("/api/gateway/v1/tokens/", json={"description": "x"}, auth=(user, pw))
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["refresh_token"] is None and len(p["token"]) == 30 and p["scope"] == "write"
    g = gw.get("/api/gateway/v1/tokens/%d/" % p["id"], auth=(user, pw)).json()
    assert g["token"] == "$encrypted$"
    assert [a["sha256"] for a in gw.live(user=user)["access_tokens"]] == [sha(p["token"])]
    assert gw.me(p["token"]).status_code == 200
    assert gw.delete("/api/gateway/v1/tokens/%d/" % p["id"], auth=(user, pw)).status_code == 204
    assert gw.me(p["token"]).status_code == 401
    # the rest as on AWX
    assert gw.password_grant(app, user, "wrong").json()["error"] == "invalid_grant"
    assert gw.post("/api/gateway/v1/tokens/", data={"x": "1"}, auth=(user, pw)).status_code == 415
    r = gw.get("/api/gateway/v1/me/")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    ext, epw = gw.user(external=True)
    r = gw.password_grant(app, ext, epw)
    assert r.status_code == 403 and r.text == EXTERNAL


def test_gateway_refresh_expiry_and_query_string(gw):
    user, pw = gw.user()
    app = gw.app()
    t = gw.password_grant(app, user, pw).json()
    r = gw.post("/o/token/?x=1", data={"grant_type": "password", "username": user, "password": pw},
                auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 400 and "URL query parameters are not allowed" in r.text
    gw.ctl("PUT", "settings", {"refresh_token_expire_seconds": 1})
    time.sleep(2.1)
    r = gw.refresh(app, t["refresh_token"])
    assert r.status_code == 403 and r.text == "The refresh token has expired."


# ---------------------------------------------------------------- faults

def test_faults(awx, setup):
    app, user, pw = setup["app"], setup["user"], setup["pw"]
    awx.ctl("PUT", "faults", {"mode": "status500", "paths": ["/api/o/token/"], "count": 1})
    r = awx.password_grant(app, user, pw)
    assert r.status_code == 500 and r.headers["Content-Type"].startswith("text/html")
    assert awx.password_grant(app, user, pw).status_code == 200  # count used up
    # paths filter: other paths unaffected; the control API never is
    awx.ctl("PUT", "faults", {"mode": "status500", "paths": ["/api/o/token/"]})
    assert awx.me(setup["tok"]["access_token"]).status_code == 200
    assert awx.ctl("GET", "health")["status"] == "ok"
    awx.ctl("PUT", "faults", {"mode": "html"})
    r = awx.me(setup["tok"]["access_token"])
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html") and "<form" in r.text
    awx.ctl("PUT", "faults", {"mode": "truncated"})
    r = awx.password_grant(app, user, pw)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        json.loads(r.text)
    awx.ctl("PUT", "faults", {"mode": "delay", "delay_seconds": 1.0, "count": 1})
    t0 = time.time()
    r = awx.password_grant(app, user, pw)
    assert r.status_code == 200 and time.time() - t0 >= 1.0
    awx.ctl("PUT", "faults", {"mode": "reset", "count": 1})
    with pytest.raises(requests.exceptions.ConnectionError):
        awx.password_grant(app, user, pw)
    awx.ctl("PUT", "faults", {"mode": "hang"})
    t0 = time.time()
    with pytest.raises(requests.exceptions.ReadTimeout):
        awx.get("/api/v2/me/", timeout=1.0)
    assert time.time() - t0 < 5
    awx.ctl("DELETE", "faults")
    assert awx.me(setup["tok"]["access_token"]).status_code == 200
    log = awx.ctl("GET", "requests")["requests"]
    assert any(e["fault"] == "reset" and e["status"] is None for e in log)


def test_bad_fault_requests(awx):
    for bad in ({"mode": "explode"}, {"mode": "delay", "count": 0}, {"mode": "delay", "paths": "/api/"}):
        assert requests.put(awx.url + "/_standin/faults", json=bad, timeout=10).status_code == 400


# ---------------------------------------------------------------- control API

def test_requests_log(awx, setup):
    awx.ctl("DELETE", "requests")
    assert awx.ctl("GET", "requests")["requests"] == []
    awx.password_grant(setup["app"], setup["user"], "wrong")
    awx.me(setup["tok"]["access_token"])
    awx.get("/api/v2/me/", auth=(setup["user"], setup["pw"]))
    log = awx.ctl("GET", "requests")["requests"]
    assert [(e["method"], e["path"], e["status"], e["grant_type"], e["user"], e["error"]) for e in log] == [
        ("POST", "/api/o/token/", 400, "password", setup["user"], "invalid_grant"),
        ("GET", "/api/v2/me/", 200, None, setup["user"], None),
        ("GET", "/api/v2/me/", 200, None, setup["user"], None)]
    assert log[0]["seq"] < log[1]["seq"] < log[2]["seq"] and log[0]["time"] <= log[2]["time"] <= time.time() + 1
    later = awx.ctl("GET", "requests", params={"since": log[1]["seq"]})["requests"]
    assert [e["seq"] for e in later] == [log[2]["seq"]]


def test_tokens_listing_shows_exactly_the_live_ones(awx):
    user, pw = awx.user()
    app = awx.app()
    t1 = awx.password_grant(app, user, pw).json()
    t2 = awx.refresh(app, t1["refresh_token"]).json()
    pat = awx.post("/api/v2/tokens/", json={"description": "d"}, auth=(user, pw)).json()
    live = awx.live(user=user)
    assert sorted(a["sha256"] for a in live["access_tokens"]) == sorted([sha(t2["access_token"]), sha(pat["token"])])
    by_sha = {a["sha256"]: a for a in live["access_tokens"]}
    assert by_sha[sha(pat["token"])]["application"] is None and by_sha[sha(pat["token"])]["description"] == "d"
    assert by_sha[sha(t2["access_token"])]["application"] == app["name"]
    assert by_sha[sha(t2["access_token"])]["scope"] == "read write"
    assert {(r["sha256"], r["revoked"]) for r in live["refresh_tokens"]} == {
        (sha(t1["refresh_token"]), True), (sha(t2["refresh_token"]), False)}
    assert awx.live(user=user, application=app["name"])["access_tokens"] == [by_sha[sha(t2["access_token"])]]
    assert awx.live(user="nobody-here")["access_tokens"] == []


def test_control_api_validation(awx):
    r = requests.post(awx.url + "/_standin/applications", json={"name": "x", "grant_type": "implicit"}, timeout=10)
    assert r.status_code == 400
    r = requests.put(awx.url + "/_standin/settings", json={"access_token_expire_seconds": "1"}, timeout=10)
    assert r.status_code == 400
    s = awx.ctl("GET", "settings")
    assert s["access_token_expire_seconds"] == 31536000000 and s["refresh_token_expire_seconds"] == 2628000
    assert awx.ctl("GET", "health")["mode"] == "awx"


def test_fifty_concurrent_requests(awx, setup):
    app, user, pw = setup["app"], setup["user"], setup["pw"]

    def one(i):
        # A password check costs ~0.3 s of CPU (Django's default PBKDF2): 10 of them, 90 cheap calls.
        if i % 10 == 0:
            return requests.post(awx.url + awx.token_path, timeout=120, auth=(app["client_id"], app["client_secret"]),
                                 data={"grant_type": "password", "username": user, "password": pw}).status_code
        return awx.me(setup["tok"]["access_token"]).status_code
    with ThreadPoolExecutor(50) as ex:
        codes = list(ex.map(one, range(100)))
    assert codes.count(200) == 100, codes


# ---------------------------------------------------------------- process handling

def test_restart_keeps_the_db_and_tls(tmp_path):
    run = tmp_path / "run"
    try:
        restart_keeps_the_db_and_tls(tmp_path, run)
    finally:
        stop(run)  # also when an assertion failed half-way


def restart_keeps_the_db_and_tls(tmp_path, run):
    url = start(run, "awx")
    port = int((run / "port").read_text())
    assert url == "http://127.0.0.1:%d" % port == (run / "url").read_text().strip()
    s = Server(url, "awx", run)
    user, pw = s.user()
    app = s.app()
    t = s.password_grant(app, user, pw).json()
    s.me(t["access_token"])
    seq = s.ctl("GET", "requests")["requests"][-1]["seq"]
    stop(run)
    assert not (run / "pid").exists()
    with pytest.raises(requests.exceptions.ConnectionError):
        s.me(t["access_token"])
    assert start(run, "awx", "--port", str(port)) == url
    assert s.me(t["access_token"]).status_code == 200
    assert s.refresh(app, t["refresh_token"]).status_code == 200
    assert s.ctl("GET", "requests", params={"since": seq})["requests"][0]["seq"] == seq + 1
    # the server's own logs hold no token values or passwords
    stop(run)
    logs = "".join((run / f).read_text() for f in ("server.log", "access.log"))
    assert "POST /api/o/token/ 200" in logs
    for secret in (t["access_token"], t["refresh_token"], pw, app["client_secret"]):
        assert secret not in logs
    # TLS
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    url = start(run, "gateway", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"))
    requests.packages.urllib3.disable_warnings()
    try:
        assert url.startswith("https://127.0.0.1:")
        r = requests.get(url + "/api/gateway/v1/", verify=False, timeout=10)
        assert r.status_code == 200
        # another flavour's schema: the gateway starts from an empty database
        assert requests.get(url + "/api/gateway/v1/me/", auth=(user, pw), verify=False, timeout=10).status_code == 401
        names = [u["username"] for u in requests.get(url + "/_standin/users", verify=False, timeout=10).json()["users"]]
        assert user not in names
    finally:
        stop(run)


def test_stop_is_quick_with_a_hung_request(tmp_path):
    run = tmp_path / "run"
    s = Server(start(run, "awx"), "awx", run)
    s.ctl("PUT", "faults", {"mode": "hang"})
    def hung():
        try:
            s.get("/api/", timeout=30)
        except requests.exceptions.RequestException:
            pass
    th = threading.Thread(target=hung, daemon=True)
    th.start()
    time.sleep(0.5)
    t0 = time.time()
    stop(run)
    assert time.time() - t0 < 15
    th.join(20)


# ---------------------------------------------------------------- password hashing, concurrency

def test_passwords_use_djangos_default_pbkdf2(awx):
    # Django 4.2's default hasher and cost, as AWX sets no PASSWORD_HASHERS
    user, pw = awx.user()
    hashed = [u for u in awx.ctl("GET", "users")["users"] if u["username"] == user][0]["password_hash"]
    algorithm, iterations, salt, digest = hashed.split("$")
    assert (algorithm, iterations) == ("pbkdf2_sha256", "600000") and len(salt) >= 22 and digest
    # each check pays for it: a password grant takes at least as long as one PBKDF2 of that cost
    one = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", pw.encode(), salt.encode(), 600000)
    one = time.perf_counter() - one
    app = awx.app()
    t0 = time.perf_counter()
    assert awx.password_grant(app, user, pw).status_code == 200
    assert time.perf_counter() - t0 >= 0.5 * one


def test_password_checks_are_not_serialised(awx):
    """A cheap request is answered while another one is still hashing a password (no
    process-wide lock; the hashing releases the GIL), whatever the machine's load."""
    awx.ctl("PUT", "settings", {"password_hash_iterations": 8000000})  # a ~4 s check
    slow_user, slow_pw = awx.user()
    awx.ctl("PUT", "settings", {"password_hash_iterations": 1000})
    user, pw = awx.user()
    app = awx.app()
    slow = {}

    def slow_grant():
        t0 = time.perf_counter()
        slow["status"] = awx.password_grant(app, slow_user, slow_pw, timeout=120).status_code
        slow["took"] = time.perf_counter() - t0
    th = threading.Thread(target=slow_grant)
    th.start()
    time.sleep(0.3)  # the slow one is hashing now
    t0 = time.perf_counter()
    assert awx.password_grant(app, user, pw).status_code == 200
    fast = time.perf_counter() - t0
    th.join()
    assert slow["status"] == 200 and slow["took"] > 1.5
    assert fast < slow["took"] / 3, (fast, slow)


# ---------------------------------------------------------------- transactions

def test_a_5xx_commits_nothing(awx, setup):
    """ATOMIC_REQUESTS: the refresh whose access token was deleted raises (HTTP 500) after DOT
    revoked the refresh token and created new tokens in the same transaction: all rolled back."""
    user, pw, app, tok = setup["user"], setup["pw"], setup["app"], setup["tok"]
    tid = awx.get("/api/v2/tokens/", auth=(user, pw)).json()["results"][0]["id"]
    assert awx.delete("/api/v2/tokens/%d/" % tid, auth=(user, pw)).status_code == 204
    before = awx.live(user=user)
    assert awx.refresh(app, tok["refresh_token"]).status_code == 500
    after = awx.live(user=user)
    assert after == before
    assert [r["revoked"] for r in after["refresh_tokens"]] == [False]


def test_concurrent_refresh_without_serialisation_gives_the_same_pair(awx, setup):
    """django-oauth-toolkit 1.7.1 on PostgreSQL, left alone: a refresh that overlaps another of the
    same token waits for its row lock, then answers 200 with the pair the first one created."""
    awx.ctl("PUT", "settings", {"serialize_refresh_token_use": False})
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: awx.refresh(setup["app"], setup["tok"]["refresh_token"]), range(4)))
    ok = [r.json() for r in results if r.status_code == 200]
    assert ok and all(r.status_code in (200, 400) for r in results)
    assert len({(t["access_token"], t["refresh_token"]) for t in ok}) == 1
    live = awx.live(user=setup["user"])
    assert [a["sha256"] for a in live["access_tokens"]] == [sha(ok[0]["access_token"])]
    assert len(live["refresh_tokens"]) == 2


def test_concurrent_refresh_gateway_only_one_wins(gw):
    user, pw = gw.user()
    app = gw.app()
    t = gw.password_grant(app, user, pw).json()
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: gw.refresh(app, t["refresh_token"]), range(4)))
    assert sorted(r.status_code for r in results) == [201, 400, 400, 400]
    assert all(r.json() == {"error": "invalid_grant"} for r in results if r.status_code == 400)


# ---------------------------------------------------------------- token listing (AWX)

def make_tokens(awx, user, pw, n, **body):
    return [awx.post("/api/v2/tokens/", json=dict(body, description="%s-%d" % (body.get("description", "t"), i)),
                     auth=(user, pw)).json() for i in range(n)]


def test_token_list_pagination(awx):
    user, pw = awx.user()
    made = make_tokens(awx, user, pw, 27)
    ids = [t["id"] for t in made]
    r = awx.get("/api/v2/tokens/", auth=(user, pw)).json()
    assert r["count"] == 27 and [t["id"] for t in r["results"]] == ids[:25] and r["previous"] is None
    assert r["next"] == "/api/v2/tokens/?page=2"
    r2 = awx.get(r["next"], auth=(user, pw)).json()
    assert [t["id"] for t in r2["results"]] == ids[25:] and r2["next"] is None and r2["previous"] == "/api/v2/tokens/?page=1"  # AWX keeps page=1
    r = awx.get("/api/v2/tokens/?page_size=500", auth=(user, pw)).json()  # capped at 200
    assert len(r["results"]) == 27 and r["next"] is None
    r = awx.get("/api/v2/tokens/?page_size=10&page=2", auth=(user, pw)).json()
    assert [t["id"] for t in r["results"]] == ids[10:20]
    assert r["next"] == "/api/v2/tokens/?page=3&page_size=10" and r["previous"] == "/api/v2/tokens/?page=1&page_size=10"
    bad = awx.get("/api/v2/tokens/?page=4&page_size=10", auth=(user, pw))
    assert bad.status_code == 404 and bad.json() == {"detail": "Invalid page."}
    assert awx.get("/api/v2/tokens/?page=0", auth=(user, pw)).status_code == 404
    r = awx.get("/api/v2/tokens/?count_disabled=1&page_size=5", auth=(user, pw)).json()
    assert set(r) == {"results"} and len(r["results"]) == 5
    item = awx.get("/api/v2/tokens/?id=%d" % ids[0], auth=(user, pw)).json()["results"][0]
    assert list(item) == ["id", "type", "url", "related", "summary_fields", "created", "modified", "description",
                          "user", "token", "refresh_token", "application", "expires", "scope"]
    assert item["token"] == "************" and item["refresh_token"] is None


def test_token_list_visibility(awx):
    alice, apw = awx.user()
    bob, bpw = awx.user()
    admin, dpw = awx.user(superuser=True)
    a = make_tokens(awx, alice, apw, 2)
    b = make_tokens(awx, bob, bpw, 1)
    app = awx.app()
    at = awx.password_grant(app, alice, apw).json()
    mine = awx.get("/api/v2/tokens/", auth=(alice, apw)).json()["results"]
    assert len(mine) == 3 and {t["user"] for t in mine} == {a[0]["user"]}
    everyone = {t["id"] for t in awx.get("/api/v2/tokens/?page_size=200&order_by=-id", auth=(admin, dpw)).json()["results"]}
    assert {t["id"] for t in a + b} <= everyone
    # users/{id}/tokens/: the URL's user, as far as the caller sees; someone else's: 403
    r = awx.get("/api/v2/users/%s/tokens/" % alice, auth=(alice, apw)).json()
    assert r["count"] == 3
    assert awx.get("/api/v2/users/%s/tokens/" % alice, auth=(admin, dpw)).json()["count"] == 3
    r = awx.get("/api/v2/users/%s/tokens/" % bob, auth=(alice, apw))
    assert r.status_code == 403 and r.json() == {"detail": "You do not have permission to perform this action."}
    assert awx.get("/api/v2/users/nobody-%s/tokens/" % uuid.uuid4().hex[:6], auth=(alice, apw)).status_code == 404
    # personal_tokens / authorized_tokens: the caller's, whoever the URL names (AWX's get_queryset)
    r = awx.get("/api/v2/users/%s/personal_tokens/" % bob, auth=(alice, apw)).json()
    assert sorted(t["id"] for t in r["results"]) == sorted(t["id"] for t in a)
    r = awx.get("/api/v2/users/%s/authorized_tokens/" % alice, auth=(alice, apw)).json()
    assert r["count"] == 1 and r["results"][0]["application"] == app["id"]
    assert r["results"][0]["refresh_token"] == "************"
    # applications/{id}/tokens/
    r = awx.get("/api/v2/applications/%d/tokens/" % app["id"], auth=(alice, apw)).json()
    assert r["count"] == 1 and r["results"][0]["summary_fields"]["application"]["name"] == app["name"]
    assert awx.get("/api/v2/applications/%d/tokens/" % app["id"], auth=(bob, bpw)).json()["count"] == 0
    assert awx.get("/api/v2/applications/999999/tokens/", auth=(bob, bpw)).status_code == 404
    assert at["access_token"]


def test_application_list_shows_the_callers_applications_without_secrets(awx):
    alice, apw = awx.user()
    bob, bpw = awx.user()
    admin, dpw = awx.user(superuser=True)
    mine = [awx.app(owner=alice) for _ in range(3)]
    other = awx.app(owner=bob)
    r = awx.get("/api/v2/applications/?order_by=id&page_size=2", auth=(alice, apw))
    assert r.status_code == 200
    page = r.json()
    assert page["count"] == 3 and page["next"] and len(page["results"]) == 2
    rest = awx.get(page["next"], auth=(alice, apw)).json()
    listed = page["results"] + rest["results"]
    assert [a["client_id"] for a in listed] == [a["client_id"] for a in mine]
    assert [a["id"] for a in listed] == [a["id"] for a in mine]
    assert all("client_secret" not in a for a in listed)
    everyone = awx.get("/api/v2/applications/?page_size=200", auth=(admin, dpw)).json()
    assert other["client_id"] in {a["client_id"] for a in everyone["results"]}
    assert awx.get("/api/v2/applications/?page=9", auth=(bob, bpw)).status_code == 404
    assert awx.get("/api/v2/applications/").status_code == 401


def test_token_list_filters(awx):
    user, pw = awx.user()
    app = awx.app()
    first = make_tokens(awx, user, pw, 2, description="AwxToken ns/alpha")
    time.sleep(0.05)
    middle = awx.get("/api/v2/tokens/?id=%d" % first[1]["id"], auth=(user, pw)).json()["results"][0]["created"]
    time.sleep(0.05)
    later = make_tokens(awx, user, pw, 1, description="other")
    apptok = awx.post("/api/v2/tokens/", json={"application": app["id"], "description": "app"}, auth=(user, pw)).json()

    def ids(query):
        r = awx.get("/api/v2/tokens/?" + query, auth=(user, pw))
        assert r.status_code == 200, (query, r.text)
        return [t["id"] for t in r.json()["results"]]
    f, l = [t["id"] for t in first], [t["id"] for t in later]
    assert ids("description__icontains=ALPHA") == f
    assert ids("created__gt=" + middle) == l + [apptok["id"]]
    assert ids("created__gte=" + middle) == [f[1]] + l + [apptok["id"]]
    assert ids("created__lt=" + middle) == [f[0]]
    assert ids("application=%d" % app["id"]) == [apptok["id"]]
    assert ids("application__isnull=true") == f + l
    assert ids("application__isnull=false") == [apptok["id"]]
    assert ids("user=%d" % first[0]["user"]) == f + l + [apptok["id"]]
    assert ids("id=%d" % l[0]) == l
    assert ids("id__in=%d,%d" % (f[0], l[0])) == [f[0], l[0]]
    assert ids("not__description__icontains=alpha&application__isnull=true") == l
    assert ids("or__id=%d&or__id=%d" % (f[0], f[1])) == f
    assert ids("order_by=-id") == list(reversed(f + l + [apptok["id"]]))
    assert ids("order_by=description,id") == f + [apptok["id"]] + l  # "AwxToken..." < "app" < "other" (C collation)
    assert ids("search=alpha") == f
    assert ids("description__icontains=alpha&order_by=-created") == list(reversed(f))

    def bad(query, status=400):
        r = awx.get("/api/v2/tokens/?" + query, auth=(user, pw))
        assert r.status_code == status, (query, r.status_code, r.text)
        return r.json()["detail"]
    assert bad("nosuchfield=1") == "OAuth2AccessToken has no field named 'nosuchfield'"
    assert "invalid format" in bad("created__gt=yesterday")
    assert bad("application=abc") == "Invalid application id: abc"
    assert bad("order_by=nosuch") == "OAuth2AccessToken has no field named 'nosuch'"
    assert bad("id__in=") == "cannot provide empty value for __in"
    assert bad("token=abc", 403) == "Filtering on token is not allowed."
    assert bad("user__password=x", 403) == "Filtering on password is not allowed."
    assert bad("application__isnull=maybe").startswith("Unable to convert")


def test_date_header(awx, gw):
    for s in (awx, gw):
        r = s.get(s.api)
        parsed = email.utils.parsedate_to_datetime(r.headers["Date"])
        assert abs(parsed.timestamp() - time.time()) < 60 and r.headers["Date"].endswith(" GMT")


# ---------------------------------------------------------------- gateway: django-ansible-base's code

def test_gateway_rest_tokens_and_lists(gw):
    user, pw = gw.user()
    admin, apw = gw.user(superuser=True)
    app = gw.app()
    p = gw.post("/api/gateway/v1/tokens/", json={"description": "AwxToken ns/x"}, auth=(user, pw))
    assert p.status_code == 201 and p.json()["token"] and p.json()["refresh_token"] is None
    # stored as $sha256$ of the value
    assert [a["sha256"] for a in gw.live(user=user)["access_tokens"]] == [sha(p.json()["token"])]
    listed = gw.get("/api/gateway/v1/tokens/?description__icontains=awxtoken", auth=(user, pw)).json()
    assert listed["count"] == 1 and listed["results"][0]["token"] == "$encrypted$"
    for k in ("created_by", "modified_by", "last_used", "description", "scope", "expires"):
        assert k in listed["results"][0]
    # app tokens over REST: superusers only (django-ansible-base's permission)
    r = gw.post("/api/gateway/v1/tokens/", json={"application": app["id"]}, auth=(user, pw))
    assert r.status_code == 403
    r = gw.post("/api/gateway/v1/tokens/", json={"application": app["id"]}, auth=(admin, apw))
    assert r.status_code == 201 and r.json()["refresh_token"]
    uid = gw.me(p.json()["token"]).json()["results"][0]["id"]
    assert gw.get("/api/gateway/v1/users/%d/personal_tokens/" % uid, auth=(user, pw)).json()["count"] == 1
    assert gw.post("/api/gateway/v1/users/%d/personal_tokens/" % uid, json={}, auth=(user, pw)).status_code == 405


def test_gateway_refresh_after_delete_is_html_500_and_commits_nothing(gw):
    user, pw = gw.user()
    admin, apw = gw.user(superuser=True)
    app = gw.app()
    t = gw.password_grant(app, user, pw).json()
    tid = gw.get("/api/gateway/v1/tokens/", auth=(user, pw)).json()["results"][0]["id"]
    assert gw.delete("/api/gateway/v1/tokens/%d/" % tid, auth=(user, pw)).status_code == 204
    before = gw.live(user=user)
    r = gw.refresh(app, t["refresh_token"])
    assert r.status_code == 500 and r.headers["Content-Type"].startswith("text/html")
    assert gw.live(user=user) == before
    # revoking a plain token: 200, nothing revoked
    t2 = gw.password_grant(app, user, pw).json()
    r = gw.post("/o/revoke_token/", data={"token": t2["access_token"]}, auth=(app["client_id"], app["client_secret"]))
    assert r.status_code == 200 and gw.me(t2["access_token"]).status_code == 200


def test_gateway_runtime_lifetimes(gw):
    user, pw = gw.user()
    app = gw.app()
    gw.ctl("PUT", "settings", {"access_token_expire_seconds": 77})
    r = gw.password_grant(app, user, pw)
    assert r.status_code == 201 and r.json()["expires_in"] == 77
    p = gw.post("/api/gateway/v1/tokens/", json={}, auth=(user, pw)).json()
    left = datetime.datetime.fromisoformat(p["expires"].replace("Z", "+00:00")) - datetime.datetime.now(datetime.timezone.utc)
    assert 60 < left.total_seconds() <= 77
    gw.ctl("DELETE", "settings")
    assert gw.password_grant(app, user, pw).json()["expires_in"] == 31536000


# ---------------------------------------------------------------- faults after a commit

def test_faults_after_commit(awx):
    user, pw = awx.user()
    app = awx.app()
    awx.ctl("DELETE", "requests")
    # delay_after: processed and committed at once, answered later
    awx.ctl("PUT", "faults", {"mode": "delay_after", "delay_seconds": 1.5, "paths": ["/api/v2/tokens/"], "count": 1})
    seen = []

    def creator():
        seen.append(awx.post("/api/v2/tokens/", json={"description": "slow"}, auth=(user, pw), timeout=30))
    th = threading.Thread(target=creator)
    t0 = time.time()
    th.start()
    deadline = time.time() + 1.2
    while time.time() < deadline and not awx.live(user=user)["access_tokens"]:
        time.sleep(0.05)
    assert len(awx.live(user=user)["access_tokens"]) == 1 and not seen  # committed, not yet answered
    th.join()
    assert seen[0].status_code == 201 and time.time() - t0 >= 1.5
    # reset_after_commit: no answer, but the token exists
    awx.ctl("PUT", "faults", {"mode": "reset_after_commit", "paths": ["/api/o/token/"], "count": 1})
    with pytest.raises(requests.exceptions.ConnectionError):
        awx.password_grant(app, user, pw)
    assert len(awx.live(user=user)["access_tokens"]) == 2
    # cut_after_commit: status line, headers and part of the body, then the reset
    awx.ctl("PUT", "faults", {"mode": "cut_after_commit", "paths": ["/api/o/token/"], "count": 1})
    with pytest.raises(requests.exceptions.RequestException):
        awx.password_grant(app, user, pw).json()
    assert len(awx.live(user=user)["access_tokens"]) == 3
    import http.client
    import urllib.parse
    u = urllib.parse.urlsplit(awx.url)
    awx.ctl("PUT", "faults", {"mode": "cut_after_commit", "paths": ["/api/v2/tokens/"], "count": 1})
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/api/v2/tokens/", body=json.dumps({}), headers={
        "Content-Type": "application/json",
        "Authorization": "Basic " + __import__("base64").b64encode(("%s:%s" % (user, pw)).encode()).decode()})
    resp = conn.getresponse()
    assert resp.status == 201 and resp.getheader("Content-Type") == "application/json"
    total = int(resp.getheader("Content-Length"))
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    conn.close()
    assert total > 100 and len(awx.live(user=user)["access_tokens"]) == 4
    log = [e for e in awx.ctl("GET", "requests")["requests"] if e["fault"]]
    assert [(e["path"], e["fault"], e["status"]) for e in log] == [
        ("/api/v2/tokens/", "delay_after", 201), ("/api/o/token/", "reset_after_commit", 200),
        ("/api/o/token/", "cut_after_commit", 200), ("/api/v2/tokens/", "cut_after_commit", 201)]
    # the faults before processing still commit nothing
    awx.ctl("PUT", "faults", {"mode": "reset", "paths": ["/api/o/token/"], "count": 1})
    with pytest.raises(requests.exceptions.ConnectionError):
        awx.password_grant(app, user, pw)
    awx.ctl("PUT", "faults", {"mode": "status500", "paths": ["/api/o/token/"], "count": 1})
    assert awx.password_grant(app, user, pw).status_code == 500
    assert len(awx.live(user=user)["access_tokens"]) == 4


def test_faults_after_commit_gateway(gw):
    user, pw = gw.user()
    app = gw.app()
    gw.ctl("PUT", "faults", {"mode": "reset_after_commit", "paths": ["/o/token/"], "count": 1})
    with pytest.raises(requests.exceptions.ConnectionError):
        gw.password_grant(app, user, pw)
    assert len(gw.live(user=user)["access_tokens"]) == 1
    log = gw.ctl("GET", "requests")["requests"]
    assert (log[-1]["fault"], log[-1]["status"], log[-1]["user"]) == ("reset_after_commit", 201, user)


def test_password_cost_setting_and_rehash_on_login(awx):
    awx.ctl("PUT", "settings", {"password_hash_iterations": 1000})
    user, pw = awx.user()

    def stored():
        return [u for u in awx.ctl("GET", "users")["users"] if u["username"] == user][0]["password_hash"]
    assert stored().startswith("pbkdf2_sha256$1000$")
    app = awx.app()
    assert awx.password_grant(app, user, pw).status_code == 200
    assert stored().startswith("pbkdf2_sha256$1000$")
    # back at Django's default, a login re-hashes at that cost (Django's must_update)
    awx.ctl("DELETE", "settings")
    assert awx.password_grant(app, user, pw).status_code == 200
    assert stored().startswith("pbkdf2_sha256$600000$")
    r = requests.put(awx.url + "/_standin/settings", json={"password_hash_iterations": 0}, timeout=10)
    assert r.status_code == 400


def test_start_sets_the_default_password_cost(tmp_path):
    run = tmp_path / "run"
    s = Server(start(run, "awx", "--password-hash-iterations", "2000"), "awx", run)
    try:
        assert s.ctl("GET", "settings")["password_hash_iterations"] == 2000
        user, _ = s.user()
        assert [u for u in s.ctl("GET", "users")["users"] if u["username"] == user][0]["password_hash"].startswith(
            "pbkdf2_sha256$2000$")
        s.ctl("PUT", "settings", {"password_hash_iterations": 3000})
        assert s.ctl("DELETE", "settings")["password_hash_iterations"] == 2000  # back to the start's default
    finally:
        stop(run)
    bad = subprocess.run([SH, "start", str(run), "--password-hash-iterations", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "positive integer" in bad.stderr


# ---------------------------------------------------------------- authorization code (browser sign-in)

LOOPBACK = "http://127.0.0.1:8765/callback"


class Inputs(html.parser.HTMLParser):
    """The <input> fields of a page's first form: name -> value (submit buttons under their value)."""

    def __init__(self):
        super().__init__()
        self.fields, self.buttons, self.action = {}, {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = a.get("action")
        if tag != "input":
            return
        if a.get("type") == "submit":
            self.buttons[a.get("value")] = a.get("name")
        elif a.get("name"):
            self.fields[a["name"]] = a.get("value") or ""


def form_of(page):
    p = Inputs()
    p.feed(page)
    return p


def pkce_pair():
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def authorize_path(server):
    return "/o/authorize/" if server.mode == "gateway" else "/api/o/authorize/"


def login_path(server):
    return "/api/gateway/v1/login/" if server.mode == "gateway" else "/api/login/"


def code_app(server, redirect_uris=(LOOPBACK,), client_type="confidential", **extra):
    return server.ctl("POST", "applications", {"name": uniq("app"), "client_type": client_type,
                                                "grant_type": "authorization-code",
                                                "redirect_uris": list(redirect_uris), **extra})


def authorize_url(server, app, challenge, state, redirect_uri=LOOPBACK):
    q = {"response_type": "code", "client_id": app["client_id"], "redirect_uri": redirect_uri,
         "scope": "read write", "state": state, "code_challenge": challenge, "code_challenge_method": "S256"}
    return server.url + authorize_path(server) + "?" + urllib.parse.urlencode(q)


def sign_in(server, url, user, pw):
    """What the browser does up to the consent page: the authorize URL sends it to the login
    page, the login form (with its CSRF token) sets a session, and the authorize URL again shows
    the consent form. Returns (session, consent page response)."""
    s = requests.Session()
    r = s.get(url, allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text
    login = urllib.parse.urljoin(url, r.headers["Location"])
    assert urllib.parse.urlparse(login).path == login_path(server)
    assert urllib.parse.parse_qs(urllib.parse.urlparse(login).query)["next"] == [url[len(server.url):]]
    page = s.get(login, timeout=30)
    assert page.status_code == 200
    form = form_of(page.text)
    assert set(form.fields) == {"csrfmiddlewaretoken", "next", "username", "password"}
    # the login page keeps "next", the authorize URL
    assert form.fields["next"] == url[len(server.url):]
    r = s.post(urllib.parse.urljoin(login, form.action), allow_redirects=False, timeout=30,
               data=dict(form.fields, username=user, password=pw), headers={"Referer": login})
    assert r.status_code == 302, r.text
    assert urllib.parse.urljoin(login, r.headers["Location"]) == url
    consent = s.get(url, allow_redirects=False, timeout=30)
    return s, consent


def consent(server, session, url, page, allow):
    form = form_of(page.text)
    assert form.buttons == {"Cancel": None, "Authorize": "allow"}
    data = dict(form.fields)
    if allow:
        data["allow"] = "Authorize"
    r = session.post(url, data=data, allow_redirects=False, timeout=30, headers={"Referer": url})
    return r


def callback_query(r, redirect_uri=LOOPBACK):
    assert r.status_code == 302, r.text
    loc = r.headers["Location"]
    assert loc.split("?")[0] == redirect_uri.split("?")[0]
    return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlparse(loc).query).items()}


def exchange(server, app, code, verifier, redirect_uri=LOOPBACK):
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
    if app["client_secret"]:
        return server.post(server.token_path, data=data, auth=(app["client_id"], app["client_secret"]))
    return server.post(server.token_path, data=dict(data, client_id=app["client_id"]))


@pytest.mark.parametrize("mode", ["awx", "gateway"])
def test_authorization_code_flow_with_pkce(servers, mode):
    server = servers(mode)
    user, pw = server.user()
    app = code_app(server)
    assert app["redirect_uris"] == [LOOPBACK] and app["grant_type"] == "authorization-code"
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    url = authorize_url(server, app, challenge, state)
    s, page = sign_in(server, url, user, pw)
    assert page.status_code == 200
    form = form_of(page.text)
    assert form.fields["code_challenge"] == challenge and form.fields["code_challenge_method"] == "S256"
    assert form.fields["state"] == state and form.fields["redirect_uri"] == LOOPBACK
    assert form.fields["client_id"] == app["client_id"] and form.fields["response_type"] == "code"
    q = callback_query(consent(server, s, url, page, allow=True))
    assert set(q) == {"code", "state"} and q["state"] == state
    assert len(q["code"]) == 30 and q["code"].isalnum()

    r = exchange(server, app, q["code"], verifier)
    assert r.status_code == server.ok, r.text
    t = r.json()
    assert {"access_token", "refresh_token", "expires_in", "token_type", "scope"} <= set(t)
    assert t["scope"] == "read write" and t["token_type"] == "Bearer"
    assert t["expires_in"] == (31536000 if mode == "gateway" else 31536000000)
    assert server.me(t["access_token"]).status_code == 200
    # a code works once
    r = exchange(server, app, q["code"], verifier)
    assert r.status_code == 400 and r.json() == {"error": "invalid_grant"}

    # refresh with the application's credentials alone: rotation kills the old access token at once
    r = server.refresh(app, t["refresh_token"])
    assert r.status_code == server.ok, r.text
    t2 = r.json()
    assert t2["access_token"] != t["access_token"] and t2["refresh_token"] != t["refresh_token"]
    assert server.me(t["access_token"]).status_code == 401
    assert server.me(t2["access_token"]).status_code == 200
    r = server.refresh(app, t["refresh_token"])
    assert r.status_code == 400 and r.json() == {"error": "invalid_grant"}


def test_authorization_code_wrong_verifier_is_invalid_grant(awx):
    user, pw = awx.user()
    app = code_app(awx)
    verifier, challenge = pkce_pair()
    url = authorize_url(awx, app, challenge, "s1")
    s, page = sign_in(awx, url, user, pw)
    q = callback_query(consent(awx, s, url, page, allow=True))
    r = exchange(awx, app, q["code"], pkce_pair()[0])
    assert r.status_code == 400 and r.json() == {"error": "invalid_grant"}
    r = exchange(awx, app, q["code"], None)
    assert r.status_code == 400 and r.json() == {"error": "invalid_request", "error_description": "Code verifier required."}
    # the failed attempts did not use the code up
    r = exchange(awx, app, q["code"], verifier)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("mode", ["awx", "gateway"])
def test_authorization_code_deny_redirects_with_access_denied(servers, mode):
    server = servers(mode)
    user, pw = server.user()
    app = code_app(server)
    url = authorize_url(server, app, pkce_pair()[1], "st-deny")
    s, page = sign_in(server, url, user, pw)
    q = callback_query(consent(server, s, url, page, allow=False))
    assert q == {"error": "access_denied", "state": "st-deny"}
    assert server.live(application=app["name"])["access_tokens"] == []


@pytest.mark.parametrize("mode", ["awx", "gateway"])
def test_authorization_code_unregistered_redirect_uri_never_redirects(servers, mode):
    server = servers(mode)
    user, pw = server.user()
    app = code_app(server)
    for wrong in ("http://127.0.0.1:8766/callback", "http://localhost:8765/callback",
                  "http://127.0.0.1:8765/other"):
        url = authorize_url(server, app, pkce_pair()[1], "st", redirect_uri=wrong)
        s, page = sign_in(server, url, user, pw)
        assert page.status_code == 400 and "Location" not in page.headers
        assert "Mismatching redirect URI." in page.text


def test_authorization_code_loopback_without_port_allows_any_port(awx):
    """RFC 8252 §7.3 as DOT implements it: a registered 127.0.0.1 URI without a port."""
    user, pw = awx.user()
    app = code_app(awx, redirect_uris=("http://127.0.0.1/callback",))
    verifier, challenge = pkce_pair()
    url = authorize_url(awx, app, challenge, "st", redirect_uri="http://127.0.0.1:40123/callback")
    s, page = sign_in(awx, url, user, pw)
    assert page.status_code == 200
    q = callback_query(consent(awx, s, url, page, allow=True), "http://127.0.0.1:40123/callback")
    r = exchange(awx, app, q["code"], verifier, redirect_uri="http://127.0.0.1:40123/callback")
    assert r.status_code == 200, r.text


def test_authorization_code_public_app_and_skip_authorization(awx):
    user, pw = awx.user()
    app = code_app(awx, client_type="public", skip_authorization=True)
    assert app["client_secret"] is None and app["skip_authorization"] is True
    verifier, challenge = pkce_pair()
    url = authorize_url(awx, app, challenge, "st-skip")
    s, page = sign_in(awx, url, user, pw)
    q = callback_query(page)  # no consent page: straight back with a code
    assert q["state"] == "st-skip"
    r = exchange(awx, app, q["code"], verifier)
    assert r.status_code == 200, r.text


def test_login_page_failed_login_is_401(awx):
    user, pw = awx.user()
    s = requests.Session()
    page = s.get(awx.url + "/api/login/", timeout=30)
    form = form_of(page.text)
    r = s.post(awx.url + "/api/login/", data=dict(form.fields, username=user, password="wrong"),
               allow_redirects=False, timeout=30)
    assert r.status_code == 401
    r = s.post(awx.url + "/api/login/", data=dict(form.fields, username=user, password=pw), allow_redirects=False,
               timeout=30)
    assert r.status_code == 302 and r.headers["X-API-Session-Cookie-Name"] == "awx_sessionid"
    assert "awx_sessionid" in s.cookies
    # no CSRF token, no login
    r = requests.post(awx.url + "/api/login/", data={"username": user, "password": pw}, allow_redirects=False,
                      timeout=30)
    assert r.status_code == 403


def test_authorization_code_app_needs_redirect_uris(awx):
    r = requests.post(awx.url + "/_standin/applications", timeout=30,
                      json={"name": uniq("app"), "grant_type": "authorization-code", "redirect_uris": []})
    assert r.status_code == 400
    assert r.json() == {"error": "redirect_uris cannot be empty with grant_type authorization-code"}
