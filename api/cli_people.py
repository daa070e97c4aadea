"""The people's commands: a person's console as a client of a pgtally server (``pgtally login``,
``whoami``, ``usage``, ``logout``). It signs in through the browser with the OAuth 2.0 device
authorization grant (RFC 8628) and keeps its tokens in the OS keyring or a 0600 file. The
operator's commands (serve, worker, db, reports, accounts, credits...) are api/cli.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import httpx

CLIENT_ID = "pgtally-cli"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def credentials_path() -> Path:
    """Where the tokens live: PGTALLY_CONFIG_DIR, or the user's config folder (platformdirs)."""
    import platformdirs

    return Path(os.environ.get("PGTALLY_CONFIG_DIR") or platformdirs.user_config_dir("pgtally")) / "credentials.json"


KEYRING_SERVICE = "pgtally"


def os_keyring():
    """The OS keyring (the keyring package, when installed and backed by a real store), or None."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    backend = keyring.get_keyring()
    return None if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) <= 0 else keyring


def load_credentials() -> dict:
    path = credentials_path()
    credentials = json.loads(path.read_text()) if path.exists() else {}
    if credentials.pop("in_keyring", False) and (keyring := os_keyring()):
        credentials.update(json.loads(keyring.get_password(KEYRING_SERVICE, credentials["url"]) or "{}"))
    return credentials


def save_credentials(credentials: dict) -> None:
    """Keep the tokens in the OS keyring when there is one (the file then names the server
    only), else in the file, readable by this user only (mode 0600), replaced atomically."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if keyring := os_keyring():
        secrets_ = {k: v for k, v in credentials.items() if k != "url"}
        keyring.set_password(KEYRING_SERVICE, credentials["url"], json.dumps(secrets_))
        credentials = {"url": credentials["url"], "in_keyring": True}
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f)
    os.replace(temporary, path)


def forget_credentials() -> None:
    credentials = load_credentials()
    if credentials.get("url") and (keyring := os_keyring()):
        try:
            keyring.delete_password(KEYRING_SERVICE, credentials["url"])
        except Exception:  # noqa: BLE001 - nothing stored there
            pass
    credentials_path().unlink(missing_ok=True)


def server_url(url: str | None) -> str:
    return (url or os.environ.get("PGTALLY_URL") or load_credentials().get("url") or "http://127.0.0.1:8000").rstrip("/")


@click.command()
@click.option("--url", default=None, help="The pgtally server (PGTALLY_URL, or the last one used, or http://127.0.0.1:8000).")
@click.option("--no-browser", is_flag=True, help="Only print the address; do not try to open a browser.")
def login(url: str | None, no_browser: bool) -> None:
    """Log in through the browser (OAuth 2.0 device authorization grant, RFC 8628): shows a code
    to approve at /device, waits, and keeps the tokens in the OS keyring when there is one, else
    in your config folder (mode 0600). An
    anonymous install's usage (its anonymous_access_token in that file) moves to your account."""
    import time
    import webbrowser

    import httpx

    base = server_url(url)
    stored = load_credentials()
    headers = {"Authorization": f"Bearer {stored['anonymous_access_token']}"} if stored.get("anonymous_access_token") else {}
    with httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/oauth/device_authorization", data={"client_id": CLIENT_ID}, headers=headers)
        if r.status_code != 200:
            raise click.ClickException(f"{base} refused the login: {r.text}")
        grant = r.json()
        click.echo(f"To sign in, open {grant['verification_uri']} and enter the code {grant['user_code']}")
        click.echo(f"(or open {grant['verification_uri_complete']})", err=True)
        if not no_browser and (os.environ.get("DISPLAY") or sys.platform in ("darwin", "win32")):
            webbrowser.open(grant["verification_uri_complete"])
        interval = grant["interval"]
        deadline = time.monotonic() + grant["expires_in"]
        while time.monotonic() < deadline:
            time.sleep(interval)
            r = http.post("/oauth/token", data={"grant_type": DEVICE_GRANT, "device_code": grant["device_code"],
                                                "client_id": CLIENT_ID})
            if r.status_code == 200:
                break
            error = r.json().get("error")
            if error == "slow_down":
                interval += 5
            elif error != "authorization_pending":
                raise click.ClickException(f"login failed: {error}: {r.json().get('error_description', '')}")
        else:
            raise click.ClickException("the code expired: run pgtally login again")
    tokens = r.json()
    save_credentials({"url": base, "access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"],
                      "expires_at": int(time.time()) + tokens["expires_in"]})
    click.echo(f"Logged in. Tokens are in {credentials_path()}")


def authorized(method: str, path: str) -> httpx.Response:
    """A request with the stored access token, refreshed (and stored again) when it expired."""
    import time

    import httpx

    credentials = load_credentials()
    if not credentials.get("access_token"):
        raise click.ClickException("not logged in: run pgtally login")
    with httpx.Client(base_url=credentials["url"], timeout=30) as http:
        if credentials.get("expires_at", 0) <= time.time() + 30:
            r = http.post("/oauth/token", data={"grant_type": "refresh_token", "refresh_token": credentials["refresh_token"]})
            if r.status_code != 200:
                raise click.ClickException("the session has ended: run pgtally login")
            tokens = r.json()
            credentials.update(access_token=tokens["access_token"], refresh_token=tokens["refresh_token"],
                               expires_at=int(time.time()) + tokens["expires_in"])
            save_credentials(credentials)
        r = http.request(method, path, headers={"Authorization": f"Bearer {credentials['access_token']}"})
    if r.status_code == 401:
        raise click.ClickException("the session has ended: run pgtally login")
    if r.status_code >= 400:
        raise click.ClickException(r.json().get("detail", r.text))
    return r


@click.command()
def whoami() -> None:
    """Who the stored login is: email, account, plan and credits."""
    me = authorized("GET", "/v1/me").json()
    who = me["user"]["email"] if me.get("user") else "an anonymous device"
    click.echo(f"{who}\naccount  {me['account']['id']}\nplan     {me['account']['plan']}\n"
               f"credits  {me['account']['credits']}")


@click.command()
def usage() -> None:
    """Credits and each allowance of the plan: used, limit and when it resets."""
    balance = authorized("GET", "/v1/balance").json()
    click.echo(f"plan     {balance['plan']}\ncredits  {balance['credits']}")
    for a in balance["allowances"]:
        limit = "unlimited" if a["limit"] is None else a["limit"]
        click.echo(f"{a['meter']:<9}{a['used']} of {limit} {a['unit']}s this {a['period']}, resets {a['resets_at']}")


@click.command()
def logout() -> None:
    """End the stored login's session on the server and forget its tokens."""
    if load_credentials().get("access_token"):
        try:
            authorized("POST", "/v1/auth/logout")
        except click.ClickException:
            pass                    # already ended: forget it anyway
    forget_credentials()
    click.echo("Logged out.")
