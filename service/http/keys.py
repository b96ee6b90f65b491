"""The server's two bearer keys: the API key (``Settings.api_key``), which opens the routes that run the model and
those of OpenAI's API, and the admin key (``Settings.admin_key``), which opens the admin routes; neither opens the
other's routes. A refusal says which key the route needs and what was sent: no key (a 401), a wrong one (a 401), or
the server's other key (a 403: the key is known, and it does not open the route), with a code (OpenAI's
``invalid_api_key`` for a key missing or wrong, which its clients raise as AuthenticationError)."""
from __future__ import annotations

import hmac

from service.http.errors import Refused
from service.runtime import Runtime

API_KEY, ADMIN_KEY = "API key", "admin key"
# the code of each refusal: a key missing or wrong (OpenAI's, whatever the key); the other key sent, by the key needed;
# admin routes where no admin key is set
MISSING_OR_WRONG = "invalid_api_key"
OTHER_KEY = {API_KEY: "api_key_needed", ADMIN_KEY: "admin_key_needed"}
ADMIN_DISABLED = "admin_disabled"


def parts(authorization: str | None) -> tuple[str, str]:
    """(scheme, credentials) of an Authorization header (None: ``("", "")``): the scheme up to its first space, the
    credentials after one space or more (RFC 9110 11.4: ``auth-scheme [ 1*SP token68 ]``; a tab is no SP), spaces and
    tabs at the value's ends not part of it (RFC 9110 5.5; a review: a trailing space was a 401)."""
    scheme, _, credentials = (authorization or "").strip(" \t").partition(" ")
    return scheme, credentials.lstrip(" ")


def bearer_of(authorization: str | None, key: str) -> bool:
    """Whether ``authorization`` is ``Bearer <key>`` (``parts``), the scheme in any case (``bearer``, ``BEARER``:
    RFC 7235 makes it case-insensitive). Compared in constant time, as bytes: Starlette reads a header's bytes as
    Latin-1, so any header compares, ASCII or not."""
    scheme, credentials = parts(authorization)
    scheme = "Bearer" if scheme.lower() == "bearer" else scheme
    return hmac.compare_digest(f"{scheme} {credentials}".encode("latin-1"), f"Bearer {key}".encode())


def keys_of(rt: Runtime) -> dict[str, str]:
    """The keys ``rt`` is set with, by kind (``API_KEY``, ``ADMIN_KEY``): those not set left out."""
    keys = {API_KEY: rt.settings.api_key, ADMIN_KEY: rt.settings.admin_key}
    return {kind: key for kind, key in keys.items() if key is not None}


def key_sent(rt: Runtime, authorization: str | None, first: str) -> str | None:
    """The kind of ``rt``'s key that ``authorization`` carries (``bearer_of``), ``first`` compared first; None for
    no header, or one that carries neither key (the keys differ: ``Settings``)."""
    if authorization is None:
        return None
    keys = keys_of(rt)
    for kind in sorted(keys, key=lambda kind: kind != first):
        if bearer_of(authorization, keys[kind]):
            return kind
    return None


def refusal(needed: str, sent: str | None, authorization: str | None, needs: str) -> Refused:
    """The refusal of a request that sent ``sent`` (a kind of key; None: none of the server's, in ``authorization``)
    where ``needs`` (the routes, in words) need the key of kind ``needed``: a 403 for the server's other key, else a
    401 saying whether no key or a wrong one was sent, with ``WWW-Authenticate: Bearer``."""
    wanted = f"{needs} need the {needed}, sent as Authorization: Bearer <{needed}>"
    if sent is not None:
        return Refused(403, f"{wanted}; the {sent} was sent, which does not open them", OTHER_KEY[needed])
    return Refused(401, f"{wanted}; {what_was_sent(authorization, f'the {needed}')}", MISSING_OR_WRONG,
                   headers={"WWW-Authenticate": "Bearer"})


def what_was_sent(authorization: str | None, needed: str) -> str:
    """In words, what ``authorization`` (a refused request's header) sent where ``needed`` (a key, in words) was not:
    no key (no header, an empty one, ``Bearer`` alone), another scheme than Bearer (or its space missing: a tab), or
    another key. The header itself is never echoed: it may hold a secret."""
    scheme, credentials = parts(authorization)
    if not scheme or (scheme.lower() == "bearer" and not credentials):
        return "no key was sent"
    if scheme.lower() != "bearer":
        return "the Authorization header is not 'Bearer <key>' (the scheme Bearer, a space, then the key)"
    return f"the key sent is not {needed}"


def check_api_key(rt: Runtime, authorization: str | None, needs: str) -> None:
    """Where ``rt`` has an API key, a 401 or 403 (``refusal``) unless ``authorization`` carries it; ``needs`` names
    the routes that need it, in words. None set: the routes are open, whatever is sent."""
    if API_KEY in keys_of(rt) and (sent := key_sent(rt, authorization, API_KEY)) != API_KEY:
        raise refusal(API_KEY, sent, authorization, needs)


def check_admin_key(rt: Runtime, authorization: str | None) -> None:
    """A 403 where ``rt`` has no admin key (the admin routes are disabled), else a 401 or 403 (``refusal``) unless
    ``authorization`` carries it."""
    if ADMIN_KEY not in keys_of(rt):
        raise Refused(403, rt.named("admin routes are disabled: no admin key is configured (admin_key)"),
                      ADMIN_DISABLED)
    if (sent := key_sent(rt, authorization, ADMIN_KEY)) != ADMIN_KEY:
        raise refusal(ADMIN_KEY, sent, authorization, "admin routes")


def listing_key(rt: Runtime, authorization: str | None) -> str | None:
    """The key that opens ``GET /adapters`` in ``authorization``: ``ADMIN_KEY`` (the listing with the adapters'
    paths), ``API_KEY``, or None (without them) where ``rt`` has no API key and no key was sent. A 401 for no key
    where ``rt`` has an API key, and for a key sent that is none of its keys; a 403 for a key sent where it has
    neither (no key can list the paths)."""
    sent, keys = key_sent(rt, authorization, ADMIN_KEY), keys_of(rt)
    if sent is not None or (authorization is None and API_KEY not in keys):
        return sent
    if not keys:
        raise Refused(403, rt.named("GET /adapters takes no key here: a key was sent, and this server has no API key "
                                    "and no admin key (admin_key), which would list the adapters' paths"),
                      ADMIN_DISABLED)
    takes = f"the {' or the '.join(keys)}" if API_KEY in keys else "no key, or the admin key"
    paths = " (the admin key lists the adapters' paths too)" if ADMIN_KEY in keys else ""
    what = what_was_sent(authorization, f"the {' nor the '.join(keys)}")
    raise Refused(401, f"GET /adapters takes {takes}{paths}, sent as Authorization: Bearer <key>; {what}",
                  MISSING_OR_WRONG, headers={"WWW-Authenticate": "Bearer"})
