"""Team single sign-on inside an app's authorization request (issue 25, item 4): the team's own
OpenID Connect provider signs the person in, pgtally comes back to the request, and the ID
token names the team in pgtally's namespaced claim."""

from __future__ import annotations

from urllib.parse import urlencode

from tests.http.test_oidc_provider import CLAIMS, WEB, answer, authorize_path, exchange, pkce, register, validate_id_token
from tests.http.test_sign_in import google
from tests.http.test_sso import client, corp_idp, corp_team, settings  # noqa: F401


async def test_item4_team_sso_inside_the_authorization_flow_names_the_team(client, owner, dns_zone, corp_idp):
    team, _ = await corp_team(client, owner, dns_zone, corp_idp)
    app = register(owner, "Web app", WEB, public=True, first_party=True)
    verifier, challenge = pkce()
    path = authorize_path(app["client_id"], WEB, challenge)
    start = f"/auth/sso/start?{urlencode({'email': 'pat@corp.example', 'next': path})}"
    r = await google(client, "sso-pat", start=start)
    assert r.status_code in (302, 303) and r.headers["location"] == path, r.text
    params = answer(await client.get(path, follow_redirects=False), WEB)
    tokens = (await exchange(client, params["code"], WEB, verifier, app["client_id"])).json()
    claims = await validate_id_token(client, tokens["id_token"], app["client_id"], "n-1")
    assert claims["email"] == "pat@corp.example" and claims["email_verified"] is True
    assert claims[CLAIMS]["teams"] == [{"account_id": team, "name": "Team", "role": "member"}]
