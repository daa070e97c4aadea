"""``pgtally clients``: register the product's apps as OpenID Connect clients of pgtally (issue 25),
list and revoke them, and rotate the ID-token signing key. The rules are in
sql/functions/59_oidc_provider.sql; these commands call them as the database owner."""

from __future__ import annotations

import json

import click
from joserfc.jwk import RSAKey
from psycopg.types.json import Jsonb

from api.cli import main, run_sql


@main.group()
def clients() -> None:
    """Apps that sign people in with pgtally (OpenID Connect clients)."""


@clients.command("create")
@click.option("--name", required=True, help="What people see on the consent screen.")
@click.option("--redirect-uri", "redirect_uris", multiple=True, required=True,
              help="An exact redirect URI (repeatable). A browser extension: https://<extension-id>.chromiumapp.org/")
@click.option("--public", "public", is_flag=True,
              help="A public client (browser app, extension, native app): no secret, PKCE S256 required.")
@click.option("--first-party", is_flag=True, help="The product's own app: no consent screen.")
@click.option("--origin", "origins", multiple=True,
              help="An extra browser origin allowed by CORS (repeatable), e.g. chrome-extension://<extension-id>.")
@click.option("--post-logout-redirect-uri", "logout_uris", multiple=True,
              help="Where logout may send the browser back to (repeatable, exact).")
@click.option("--json", "as_json", is_flag=True, help='Print {"client_id": ..., "client_secret": ...} and the rest as JSON.')
def clients_create(name: str, redirect_uris: tuple[str, ...], public: bool, first_party: bool, origins: tuple[str, ...],
                   logout_uris: tuple[str, ...], as_json: bool) -> None:
    """Register a client and print its id and, for a confidential client, its secret (shown once:
    only its hash is kept)."""
    (result,) = run_sql("SELECT api.oidc_create_client(%s::text, %s::text[], %s::boolean, %s::boolean, %s::text[], %s::text[])",
                        [name, list(redirect_uris), public, first_party, list(origins), list(logout_uris)])
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"client id      {result['client_id']}")
    if result["client_secret"]:
        click.echo(f"client secret  {result['client_secret']}  (shown once)")
    else:
        click.echo("public client  no secret: use PKCE (S256)")


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the clients as a JSON array.")
def clients_list(as_json: bool) -> None:
    """Every client: id, name, kind, redirect URIs, and whether it is revoked."""
    (result,) = run_sql("SELECT api.oidc_list_clients()", [])
    if as_json:
        click.echo(json.dumps(result))
        return
    for c in result:
        kind = ("public" if c["public"] else "confidential") + (", first-party" if c["first_party"] else "")
        state = f"revoked {c['revoked_at']}" if c["revoked_at"] else "active"
        click.echo(f"{c['client_id']}  {c['name']}  ({kind}, {state})  {' '.join(c['redirect_uris'])}")


@clients.command("revoke")
@click.argument("client_id")
def clients_revoke(client_id: str) -> None:
    """Revoke a client: nobody signs in to it any more, and its sessions and tokens end now."""
    (result,) = run_sql("SELECT api.oidc_revoke_client(%s::text)", [client_id])
    click.echo(f"revoked {result['client_id']} ({result['sessions_revoked']} sessions ended)")


@clients.command("rotate-key")
def clients_rotate_key() -> None:
    """Add a new ID-token signing key: it signs from within 5 minutes on (as servers re-read it),
    and the older keys stay in the JWKS until the tokens they signed have expired."""
    key = RSAKey.generate_key(2048, private=True)
    run_sql("SELECT api.oidc_add_signing_key(%s::text, %s::jsonb, %s::jsonb, true)",
            [key.thumbprint(), Jsonb(key.as_dict(private=True)), Jsonb(key.as_dict(private=False))])
    click.echo(f"new signing key {key.thumbprint()}")
