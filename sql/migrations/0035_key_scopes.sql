-- pgtally 0035: an API key's scopes are those of both 0032b (usage:reverse, operator reversal
-- keys) and 0034b (accounts:write, provisioning service keys); each of the two migrations wrote
-- the list without the other's scope.
-- depends: 0032b_reversals 0034b_provisioned_accounts

ALTER TABLE identity.api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE identity.api_keys ADD CONSTRAINT api_keys_scopes_check
  CHECK (scopes <@ '{usage:write,usage:read,billing:read,billing:manage,service,usage:reverse,accounts:write}'::text[]
         AND cardinality(scopes) > 0);
COMMENT ON COLUMN identity.api_keys.scopes IS
  'What the key may do: usage:write (POST /v1/usage/events), usage:read (check, balance, ledger), billing:read, billing:manage, service (act on behalf of any account: account_id in the request), usage:reverse (an operator key: reverse usage events of any account; issued by operators only, pgtally events reversal-key), accounts:write (with service: POST /v1/accounts/provision).';
