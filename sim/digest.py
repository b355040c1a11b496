"""HTTP Digest authentication (RFC 7616, MD5, qop=auth) as the Antminer's lighttpd does it. Nonces are stateless
(an HMAC of their issue time), so 10,000 miners keep no per-client state."""

from __future__ import annotations

import hashlib
import hmac
import re
import time

NONCE_TTL_S = 300.0
_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]+))')


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


class DigestAuth:
    def __init__(self, realm: str, user: str, password: str, secret: bytes) -> None:
        self.realm = realm
        self.user = user
        self.secret = secret
        self.ha1 = _md5(f"{user}:{realm}:{password}")

    def _sign(self, stamp: str) -> str:
        return hmac.new(self.secret, stamp.encode(), hashlib.sha256).hexdigest()[:24]

    def challenge(self) -> str:
        stamp = f"{int(time.time()):x}"
        nonce = stamp + self._sign(stamp)
        return f'Digest realm="{self.realm}", qop="auth", nonce="{nonce}", algorithm=MD5'

    def _nonce_ok(self, nonce: str) -> bool:
        stamp, sig = nonce[:-24], nonce[-24:]
        if not stamp or not hmac.compare_digest(sig, self._sign(stamp)):
            return False
        try:
            issued = int(stamp, 16)
        except ValueError:
            return False
        return 0 <= time.time() - issued <= NONCE_TTL_S

    def check(self, method: str, header: str | None) -> bool:
        """True when `header` (the Authorization value) proves the password for this request."""
        if not header or not header.lower().startswith("digest "):
            return False
        params = {k.lower(): (a if a else b) for k, a, b in _PARAM.findall(header[7:])}
        needed = ("username", "realm", "nonce", "uri", "response")
        if any(k not in params for k in needed):
            return False
        if params["username"] != self.user or params["realm"] != self.realm or not self._nonce_ok(params["nonce"]):
            return False
        ha2 = _md5(f"{method}:{params['uri']}")
        qop = params.get("qop")
        if qop == "auth":
            if "nc" not in params or "cnonce" not in params:
                return False
            expected = _md5(f"{self.ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:auth:{ha2}")
        elif qop is None:
            expected = _md5(f"{self.ha1}:{params['nonce']}:{ha2}")
        else:
            return False
        return hmac.compare_digest(expected, params["response"])
