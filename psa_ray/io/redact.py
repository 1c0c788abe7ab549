"""Masking credentials in text that leaves the process: messages, error rows, run.json, logs."""
from __future__ import annotations

import os
import re

_ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])")
_LABELLED_SECRET = re.compile(
    r"(?i)((?:aws_)?(?:secret_access_key|secret_key|secretaccesskey|session_token|security_token|"
    r"sessiontoken|x-amz-security-token|x-amz-signature|x-amz-credential|signature|password)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"'&,;}]+)")
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40,}(?![A-Za-z0-9/+=])")
_URI_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
# HTTP credentials (`Authorization: Bearer <token>`, Ray's token header), secret-named query
# parameters (`?sig=`, `&access_token=`, ...) and secret-named environment variables, as a
# runtime env or an `env` dump shows them (`"HF_TOKEN": "..."`, `DB_PASSWORD=...`).
_AUTH_HEADER = re.compile(r"(?i)\b((?:proxy-|x-ray-)?authorization[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+)?)"
                          r"([^\s\"'&,;}]+)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9._~+/-]+=*)")
_SECRET_QUERY = re.compile(r"(?i)([?&][a-z0-9_.-]*(?:sig|signature|token|key|secret|password|credential)=)"
                           r"([^&#\s\"']+)")
_SECRET_ENV_NAME = re.compile(
    r"(\b[A-Z][A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|SECRET_KEY)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"'&,;}]+)")
# Environment variables whose values are credentials wherever they appear: AWS keys and the
# Ray cluster token (KubeRay sets RAY_AUTH_TOKEN in every pod).
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
                   "RAY_AUTH_TOKEN")
REDACTED = "***"


def _looks_secret(token: str) -> bool:
    """A 40-char AWS secret key or a long session token: random base64, not a path or a hash."""
    mixed = (any(c.isupper() for c in token) and any(c.islower() for c in token)
             and any(c.isdigit() for c in token))
    if not mixed or token.startswith("/") or "//" in token:
        return False
    return len(token) >= 100 or (len(token.rstrip("=")) == 40 and token.count("/") <= 2)


def _secret_values() -> list[str]:
    """The credentials this process holds: the values of SECRET_ENV_VARS and Ray's token file
    (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token: where `ray up` nodes keep it). Values under 16
    characters are not credentials."""
    values = [os.environ.get(var, "") for var in SECRET_ENV_VARS]
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        with open(token_path) as f:
            values.append(f.read().strip())
    except OSError:
        pass
    return [v for v in values if len(v) >= 16]


def redact(text: str) -> str:
    """text with credentials replaced by `***`: AWS access key ids, secret keys and session
    tokens, the Ray cluster token, passwords and tokens in URIs, HTTP headers and environments.

    Catches: the values of SECRET_ENV_VARS and Ray's token file wherever they appear, access
    key ids (AKIA.../ASIA...), the `user:password@` part of URIs, `Authorization:` / `Bearer`
    credentials, secret-named query parameters and environment variables (`HF_TOKEN=`,
    `"DB_PASSWORD": ...`), `name=value` / `"name": "value"` pairs of secret-looking names
    (presigned URL parameters included), and bare 40-char secrets / 100+ char tokens of
    mixed-case base64.
    """
    for value in _secret_values():
        text = text.replace(value, REDACTED)
    text = _URI_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    text = _ACCESS_KEY_ID.sub(REDACTED, text)
    for labelled in (_AUTH_HEADER, _BEARER, _SECRET_QUERY, _SECRET_ENV_NAME, _LABELLED_SECRET):
        text = labelled.sub(lambda m: m.group(1) + REDACTED, text)
    return _BASE64_RUN.sub(lambda m: REDACTED if _looks_secret(m.group(0)) else m.group(0), text)
