"""The browser sign-in pages both flavours need for the authorization-code grant: a session
login (AWX's LoggedLoginView at /api/login/) and DOT's authorization view behind it."""
from django.conf import settings
from django.contrib.auth import views as auth_views
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import csrf_protect
from oauth2_provider import views as dot_views


@method_decorator(csrf_protect, name="dispatch")
class LoginView(auth_views.LoginView):
    """Django's login form, answering 401 to a failed login as AWX does (awx/api/generics.py)."""
    template_name = "standin/login.html"

    def get_default_redirect_url(self):
        return "/api/"

    def post(self, request, *args, **kwargs):
        response = super().post(request, *args, **kwargs)
        if request.user.is_authenticated:
            response["X-API-Session-Cookie-Name"] = settings.SESSION_COOKIE_NAME
        else:
            response.status_code = 401
        return response


# AWX mounts DOT's view unchanged; it is not CSRF-exempt and AWX runs CsrfViewMiddleware.
authorize = csrf_protect(dot_views.AuthorizationView.as_view())
login = LoginView.as_view()
