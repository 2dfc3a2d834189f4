"""The one scrubber of secrets: every error message, log line and saved config goes through `scrub`.

It masks, with `***`:
- the userinfo of a URL, `scheme://user:secret@host`, also when the secret holds `/` (AWS secret keys often
  do), `+` or `%2F`; a `/` makes the parse ambiguous, so from `://` through `user:` everything up to the last
  `@` before whitespace or a quote is masked (`hf://datasets/org/ds@main/x` has no `user:` and is left alone);
- the values of token query parameters (`?sig=`, `&X-Amz-Signature=`, `?token=`, `?access_token=`,
  `?api_key=`, ...) and the key fields of Azure connection strings (`AccountKey=...;`);
- bearer tokens (`Authorization: Bearer ...`) and Hugging Face tokens (`hf_...`);
- the literal values of $DIST_FT_STORAGE_OPTIONS and of the usual credential variables (AWS_SECRET_ACCESS_KEY,
  HF_TOKEN, WANDB_API_KEY, ...), and any `extra_secrets`, also URL-encoded.

`url_secret` says what kind of secret a config value holds (the config refuses such values: it is saved in
config.yaml, logs and W&B).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote

MASK = "***"
STORAGE_OPTIONS = "DIST_FT_STORAGE_OPTIONS"
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "DIST_FT_API_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_API_KEY",
    "OPENAI_API_KEY",
)
# query parameters whose value is a credential (matched whole and case-insensitively after `?`, `&` or `;`)
SECRET_PARAMS = (
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "x-goog-security-token",
    "googleaccessid",
    "awsaccesskeyid",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "auth_token",
    "api_key",
    "api-key",
    "apikey",
    "key",
    "access_key",
    "secret",
    "secret_key",
    "client_secret",
    "password",
    "passwd",
    "pwd",
    "sas",
    "sas_token",
    "code",
    "policy",
    "key-pair-id",
    "session_token",
    "security_token",
)
_SECRET_KEY_NAME = re.compile(r"(?i)key|secret|token|passw|credential|signature|sas|auth|connection")

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*:/{1,3}"  # one slash too: pathlib turns `s3://` into `s3:/`
_STOP = r"\s'\"<>`"
# scheme://userinfo@ : userinfo without `/` (any `:` / `@` in it: up to the last `@` before a `/`), or `user:`
# and then anything, `/` included, up to the last `@` before whitespace or a quote
_USERINFO = re.compile(rf"({_SCHEME})((?:[^{_STOP}/:@]*:[^{_STOP}]*|[^{_STOP}/]*)@)")
_PARAM_NAMES = "|".join(re.escape(p) for p in sorted(SECRET_PARAMS, key=len, reverse=True))  # longest first
_PARAMS = re.compile(rf"(?i)([?&;](?:{_PARAM_NAMES})=)[^&#;{_STOP}]+")
_AZURE = re.compile(r"(?i)\b((?:AccountKey|SharedAccessKey|SharedAccessSignature)=)[^;\s'\"]+")
_BEARER = re.compile(
    r"(?i)(\bbearer\s+|\bauthorization\s*[:=]\s*(?:basic\s+)?)(?!\*\*\*)[A-Za-z0-9._~+/=\-]{8,}"
)
_HF_TOKEN = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{16,}\b")


def _leaves(obj, secret_key: bool, all_values: bool, out: list) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _leaves(v, secret_key or bool(_SECRET_KEY_NAME.search(str(k))), all_values, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _leaves(v, secret_key, all_values, out)
    elif isinstance(obj, str) and (len(obj) >= 4 if secret_key else (all_values and len(obj) >= 6)):
        out.append(obj)


def option_values(opts, all_values: bool = True) -> list[str]:
    """The strings of fsspec storage options to mask: those under a credential-like key (key, secret, token,
    ...), and with `all_values` every other one of 6 characters or more too (an endpoint, an account name)."""
    out: list[str] = []
    _leaves(opts, False, all_values, out)
    return out


def env_secrets(environ: Mapping[str, str] | None = None, all_values: bool = True) -> list[str]:
    """The secret strings this environment holds: $DIST_FT_STORAGE_OPTIONS' values (`option_values`) and the
    usual credential variables'. Never raises (an unparsable $DIST_FT_STORAGE_OPTIONS is masked whole)."""
    environ = os.environ if environ is None else environ
    # shorter ones are not real credentials
    out = [environ[k] for k in SECRET_ENV if len(environ.get(k) or "") >= 8]
    raw = (environ.get(STORAGE_OPTIONS) or "").strip()
    if raw:
        try:
            out += option_values(json.loads(raw), all_values)
        except ValueError:
            out += [raw, *(t for t in re.split(r"[\s,;:=&\"'{}\[\]]+", raw) if len(t) >= 6)]
    return out


def scrub(text: str, extra_secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret it holds masked (see the module doc). `environ`: where the storage options
    and credential variables are read (default os.environ); pass {} to mask by pattern and `extra_secrets`
    only."""
    if not text:
        return text
    literal = {s for s in (*extra_secrets, *env_secrets(environ)) if isinstance(s, str) and len(s) >= 4}
    for s in sorted(literal | {quote(s, safe="") for s in literal}, key=len, reverse=True):
        text = text.replace(s, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _PARAMS.sub(rf"\1{MASK}", text)
    text = _AZURE.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    return _HF_TOKEN.sub(rf"\1{MASK}", text)


def url_secret(value: str) -> str | None:
    """What secret a config value (a path or URL) holds: 'credentials' (user:secret@ in it), or the token
    query parameter's name; None when it holds none."""
    if _USERINFO.search(value):
        return "credentials"
    m = _PARAMS.search(value)
    if m:
        return m.group(1)[1:-1]
    m = _AZURE.search(value)
    return m.group(1)[:-1] if m else None
