"""api.provision_account and api.claim_handoff with many real connections at once (issue 25, items 2 and 3)."""

from __future__ import annotations

from tests.conftest import run_concurrently


def test_item2_concurrent_provisioning_of_one_external_id_makes_one_account(owner, connections):
    key = owner.execute("SELECT api.create_account('free', 0, 'the product', 'service')").fetchone()[0]["api_key"]
    conns = connections(16)
    results = run_concurrently(16, lambda i: conns[i].execute(
        "SELECT api.provision_account(%s, NULL, 'ext-42', NULL)", [key]).fetchone()[0])
    assert all(isinstance(r, dict) for r in results), results
    assert len({r["account_id"] for r in results}) == 1
    assert [r["created"] for r in results].count(True) == 1
    assert owner.execute("SELECT count(*) FROM identity.accounts WHERE external_id = 'ext-42'").fetchone()[0] == 1


def test_item3_concurrent_claims_of_one_handoff_code_give_the_install_once(owner, connections):
    owner.execute("SELECT api.identify(NULL, 'ext-install-0123456789abcdef', NULL, '10.0.0.1', 'test')")
    (session_id,) = owner.execute("SELECT id FROM identity.sessions").fetchone()
    code = owner.execute("SELECT api.handoff_code(%s)", [session_id]).fetchone()[0]["code"]
    conns = connections(16)
    results = run_concurrently(16, lambda i: conns[i].execute("SELECT api.claim_handoff(%s)", [code]).fetchone()[0])
    claimed = [r["device_session_id"] for r in results]
    assert claimed.count(None) == 15 and str(session_id) in claimed
