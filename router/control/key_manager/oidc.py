"""Sign-in with the lab's identity provider: OpenID Connect, authorization code flow with PKCE
(S256), by Authlib's Starlette client. Authlib reads the provider's discovery document, keeps the
state, nonce and code verifier in the session, and checks the ID token (signature from the
provider's JWKS, issuer, audience, expiry, nonce). Who may come in is router/auth.py's decision
(key_manager_role): the e-mail claim decides the user."""
from __future__ import annotations

import logging

import httpx
from authlib.integrations.starlette_client import OAuth, OAuthError
from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse

from ... import auth
from ...config import Settings
from .errors import PageError
from .sessions import PATH, sign_in

log = logging.getLogger("cborg.key_manager")

router = APIRouter(include_in_schema=False)


def client(settings: Settings):
    """The provider's client, or None when CBORG_OIDC_ISSUER (and the client id) are not set."""
    if not (settings.oidc_issuer and settings.oidc_client_id):
        return None
    kwargs = {"scope": "openid email profile", "code_challenge_method": "S256", "timeout": 15}
    if not settings.oidc_client_secret:
        kwargs["token_endpoint_auth_method"] = "none"      # a public client: PKCE alone
    oauth = OAuth()
    return oauth.register("lab", client_id=settings.oidc_client_id, client_secret=settings.oidc_client_secret,
                          server_metadata_url=settings.oidc_issuer + "/.well-known/openid-configuration",
                          client_kwargs=kwargs)


def _km(request: Request):
    km = request.app.state.key_manager
    if km.oidc is None:
        raise PageError(404, "Sign-in with the lab's identity provider is not configured on this gateway.")
    return km


@router.get(PATH + "/login")
async def login(request: Request):
    km = _km(request)
    try:
        return await km.oidc.authorize_redirect(request, str(request.url_for("km_callback")))
    except (httpx.HTTPError, OAuthError, ValueError, KeyError) as e:
        log.error("OIDC: the identity provider's discovery document could not be read: %s", e)
        raise PageError(502, "The identity provider did not answer. Try again in a minute.") from None


@router.get(PATH + "/callback", name="km_callback")
async def callback(request: Request):
    km = _km(request)
    if "error" in request.query_params:
        raise PageError(401, "Sign-in was cancelled or refused by the identity provider "
                             f"({request.query_params['error'][:80]}).", signin=True)
    try:
        token = await km.oidc.authorize_access_token(request)
        claims = token.get("userinfo") or {}
        if not claims.get("email"):        # some providers put it in the userinfo answer only
            claims = {**claims, **await km.oidc.userinfo(token=token)}
    except (OAuthError, httpx.HTTPError, ValueError, KeyError) as e:
        log.warning("OIDC sign-in failed: %s", e)
        raise PageError(401, "Sign-in did not complete (it may have expired, or been started in another "
                             "tab). Start again.", signin=True) from None
    email = str(claims.get("email") or "").strip().lower()
    s = km.settings
    verified = claims.get("email_verified", True)      # (a provider that never sends the claim vouches all)
    role = auth.key_manager_role(email, s.oidc_allowed_domains, s.admin_emails, verified)
    if role is None:
        log.info("Key Manager: sign-in refused for %s", email or "(no e-mail claim)")
        request.session.clear()
        raise PageError(403, f"{email or 'This account'} may not use this service: sign in with your "
                             f"{' or '.join('@' + d for d in s.oidc_allowed_domains) or 'lab'} account.",
                        signin=True)
    sign_in(request, {"via": "oidc", "email": email, "name": str(claims.get("name") or "")[:200] or None})
    log.info("Key Manager: %s signed in (%s)", email, role)
    return RedirectResponse(PATH, 303)
