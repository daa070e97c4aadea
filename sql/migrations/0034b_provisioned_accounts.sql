-- pgtally 0034b: provisioning for a product with its own auth (issue 25). A service key with the
-- accounts:write scope creates or finds an account by the product's own id for the person.

ALTER TABLE identity.api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE identity.api_keys ADD CONSTRAINT api_keys_scopes_check
  CHECK (scopes <@ '{usage:write,usage:read,billing:read,billing:manage,service,accounts:write}'::text[] AND cardinality(scopes) > 0);
COMMENT ON COLUMN identity.api_keys.scopes IS
  'What the key may do: usage:write (POST /v1/usage/events), usage:read (check, balance, ledger), billing:read, billing:manage, service (act on behalf of any account: account_id in the request), accounts:write (with service: POST /v1/accounts/provision).';

ALTER TABLE identity.accounts
  ADD COLUMN external_id text CHECK (length(external_id) BETWEEN 1 AND 255),
  ADD COLUMN provisioned_by uuid REFERENCES identity.accounts,
  ADD CONSTRAINT accounts_external_id_pair CHECK ((external_id IS NULL) = (provisioned_by IS NULL)),
  ADD CONSTRAINT accounts_provisioned_external_id_key UNIQUE (provisioned_by, external_id);
COMMENT ON COLUMN identity.accounts.external_id IS
  'The product''s own id for the person (its users table, NextAuth, Clerk) an account was provisioned for by POST /v1/accounts/provision; unique per provisioning service account (provisioned_by). NULL otherwise.';
COMMENT ON COLUMN identity.accounts.provisioned_by IS
  'The service account whose key (scopes service and accounts:write) provisioned this account for external_id. NULL otherwise.';
