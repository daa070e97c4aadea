-- reporting views. Staff: the operators' audit log.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.audit_log AS
SELECT l.id, l.at, u.email AS staff_email, l.staff_role, l.action, l.target_account_id, l.target_user_id, l.reason,
       l.before, l.after
FROM ops.audit_log l JOIN identity.users u ON u.id = l.staff_user_id;
COMMENT ON VIEW reporting.audit_log IS 'The operators'' actions, newest last: who (email, role), what, on what, why, before and after.';

GRANT SELECT ON reporting.audit_log TO pgtally_analyst;
