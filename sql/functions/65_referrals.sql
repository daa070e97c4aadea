-- Sign-up bonus and referrals: credits granted by the transaction that records the event that
-- earns them (an email verification, a first payment), exactly once.

CREATE OR REPLACE FUNCTION identity.mark_email_verified(p_user_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  u identity.users;
  v_bonus bigint;
BEGIN
  -- The claim: the first verification only, whatever the number of links or providers.
  UPDATE identity.users SET email_verified_at = util.now()
  WHERE id = p_user_id AND email_verified_at IS NULL RETURNING * INTO u;
  IF u.id IS NULL THEN
    RETURN false;
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = u.account_id FOR NO KEY UPDATE;
  SELECT p.signup_bonus_micros INTO v_bonus
  FROM identity.accounts a JOIN billing.plans p ON p.id = identity.effective_plan(a) WHERE a.id = u.account_id;
  PERFORM ledger.grant_lot(u.account_id, 'signup_bonus', v_bonus, 'signup_bonus', 'sign-up bonus', util.now());
  PERFORM billing.qualify_referral(u.account_id, 'email_verified', 'user:' || u.id);
  RETURN true;
END $$;
COMMENT ON FUNCTION identity.mark_email_verified(uuid) IS
  'Mark a user''s email verified, the first time only (returns false after): in the same transaction grant the plan''s sign-up bonus once per person (a signup_bonus lot) and qualify a referral whose program qualifies on email_verified. Every path that verifies an address (the emailed link, a password reset, a provider that vouches for it) calls it.';

CREATE OR REPLACE FUNCTION billing.mailbox(p_email text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN domain IN ('gmail.com', 'googlemail.com') THEN replace(local, '.', '') || '@gmail.com'
              ELSE local || '@' || domain END
  FROM (SELECT regexp_replace(split_part(lower(btrim(p_email)), '@', 1), '\+.*$', '') AS local,
               rtrim(split_part(lower(btrim(p_email)), '@', 2), '.') AS domain) AS address
$$;
COMMENT ON FUNCTION billing.mailbox(text) IS
  'The mailbox an address delivers to, as far as the self-referral rule cares: lower case, the local part without a +tag (alice+2@example.com -> alice@example.com), and Gmail''s rules: dots in the local part do not count and googlemail.com is gmail.com (A.Lice+x@googlemail.com -> alice@gmail.com). Other providers'' dots are kept. Issue #22 item 10.';

CREATE OR REPLACE FUNCTION billing.attribute_referral(p_referee_account_id uuid, p_code text, p_ip text,
                                                      p_fingerprint text, p_device_account_id uuid DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  ref identity.users;
  v_reason text;
  v_status text;
  v_device_fingerprint text := (SELECT device_fingerprint FROM identity.accounts WHERE id = p_device_account_id);
BEGIN
  IF p_code IS NULL OR btrim(p_code) = '' THEN
    RETURN NULL;
  END IF;
  SELECT * INTO ref FROM identity.users WHERE referral_code = lower(btrim(p_code));
  IF NOT FOUND THEN
    RETURN 'unknown_code';
  END IF;
  v_reason := CASE
    WHEN ref.account_id = p_referee_account_id
         OR billing.mailbox(ref.email_normalized) = billing.mailbox((SELECT email_normalized FROM identity.users
                                                                    WHERE account_id = p_referee_account_id))
      THEN 'self_referral'
    WHEN v_device_fingerprint IS NOT NULL AND EXISTS (
           SELECT 1 FROM identity.accounts d WHERE d.merged_into = ref.account_id AND d.device_fingerprint = v_device_fingerprint)
      THEN 'own_device'
    WHEN p_ip IS NOT NULL AND EXISTS (
           SELECT 1 FROM identity.auth_events e
           WHERE (e.user_id = ref.id OR e.account_id = ref.account_id) AND e.ip = p_ip
             AND e.created_at > util.now() - (SELECT same_ip_window FROM billing.referral_program))
      THEN 'same_ip'
    WHEN p_fingerprint IS NOT NULL AND EXISTS (
           SELECT 1 FROM identity.accounts d WHERE d.merged_into = ref.account_id AND d.device_fingerprint = p_fingerprint)
      THEN 'same_fingerprint'
  END;
  -- One referrer per account, the first one: a second attribution changes nothing.
  INSERT INTO billing.referrals (referee_account_id, referrer_account_id, referrer_user_id, code, status, rejected_reason,
                                 signup_ip, signup_fingerprint, created_at, rejected_at)
  VALUES (p_referee_account_id, ref.account_id, ref.id, ref.referral_code,
          CASE WHEN v_reason IS NULL THEN 'signed_up' ELSE 'rejected' END, v_reason,
          left(p_ip, 64), left(coalesce(p_fingerprint, v_device_fingerprint), 256), util.now(),
          CASE WHEN v_reason IS NOT NULL THEN util.now() END)
  ON CONFLICT (referee_account_id) DO NOTHING
  RETURNING status INTO v_status;
  RETURN coalesce(v_reason, v_status, 'already_referred');
END $$;
COMMENT ON FUNCTION billing.attribute_referral(uuid, text, text, text, uuid) IS
  'At sign-up only: record who referred the new account (p_code, a person''s referral code; unknown codes are ignored), first touch (an account already referred keeps its referrer). Refused without a reward, the reason recorded: self_referral (the referrer''s own account or mailbox, billing.mailbox: alice+2@ is alice@, a.lice@gmail.com is alice@googlemail.com), own_device (the anonymous device merged at sign-up has the fingerprint of a device the referrer merged), same_ip (the referrer was seen at this IP within the program''s same_ip_window, from identity.auth_events), same_fingerprint (the fingerprint sent at sign-up is one of the referrer''s devices). Returns signed_up, the reason, unknown_code or already_referred.';

CREATE OR REPLACE FUNCTION billing.qualify_referral(p_referee_account_id uuid, p_event text, p_ref text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  prog billing.referral_program;
  r billing.referrals;
  v_referrer_lot uuid;
  v_referee_lot uuid;
BEGIN
  SELECT * INTO prog FROM billing.referral_program;
  IF prog.qualify_on IS DISTINCT FROM p_event THEN
    RETURN;
  END IF;
  -- The claim: once per referee, however often or concurrently the event is delivered.
  UPDATE billing.referrals SET status = 'qualified', qualified_at = util.now(), qualifying_event = p_event,
                               qualifying_ref = left(p_ref, 255)
  WHERE referee_account_id = p_referee_account_id AND status = 'signed_up'
  RETURNING * INTO r;
  IF r.referee_account_id IS NULL THEN
    RETURN;
  END IF;
  -- The referrer's row lock orders concurrent rewards of one referrer, so the cap is exact.
  PERFORM 1 FROM identity.accounts WHERE id = r.referrer_account_id FOR NO KEY UPDATE;
  IF (SELECT count(*) FROM billing.referrals
      WHERE referrer_account_id = r.referrer_account_id AND status = 'rewarded'
        AND rewarded_at >= date_trunc('month', util.now(), 'UTC')) >= prog.monthly_cap THEN
    UPDATE billing.referrals SET status = 'rejected', rejected_reason = 'monthly_cap', rejected_at = util.now()
    WHERE referee_account_id = r.referee_account_id;
    RETURN;
  END IF;
  v_referrer_lot := ledger.grant_lot(r.referrer_account_id, 'referral_reward', prog.referrer_reward_micros,
                                     'referral:' || r.referee_account_id, 'referral reward',
                                     util.now() + prog.holdback);
  v_referee_lot := ledger.grant_lot(r.referee_account_id, 'referral_reward', prog.referee_reward_micros,
                                    'referral-welcome', 'credits for joining through a referral',
                                    util.now() + prog.holdback);
  UPDATE billing.referrals SET status = 'rewarded', rewarded_at = util.now(),
                               referrer_lot_id = v_referrer_lot, referee_lot_id = v_referee_lot
  WHERE referee_account_id = r.referee_account_id;
END $$;
COMMENT ON FUNCTION billing.qualify_referral(uuid, text, text) IS
  'The referee did what the program qualifies on (p_event: email_verified or first_payment; p_ref names it, e.g. the payment): in the caller''s transaction, qualify the referral once and reward it: the referrer''s reward and any referee bonus as referral_reward lots, pending for the holdback (spendable after it, through one ledger transfer each); over the referrer''s monthly cap it is rejected (monthly_cap) instead. Callers lock the referee''s account.';

CREATE OR REPLACE FUNCTION billing.cancel_referral_reward(p_ref text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  r billing.referrals;
BEGIN
  SELECT * INTO r FROM billing.referrals WHERE qualifying_ref = p_ref AND status = 'rewarded';
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id IN (r.referrer_account_id, r.referee_account_id) ORDER BY id FOR NO KEY UPDATE;
  -- Only inside the holdback: a reward already spendable stays.
  UPDATE ledger.credit_lots SET status = 'canceled', settled_at = util.now()
  WHERE id IN (r.referrer_lot_id, r.referee_lot_id) AND status = 'pending' AND available_at > util.now();
  IF FOUND THEN
    UPDATE billing.referrals SET status = 'rejected', rejected_reason = 'refunded', rejected_at = util.now()
    WHERE referee_account_id = r.referee_account_id;
  END IF;
END $$;
COMMENT ON FUNCTION billing.cancel_referral_reward(text) IS
  'The qualifying payment p_ref (a PaymentIntent or invoice id) was refunded: inside the holdback, cancel the reward''s pending lots (never spendable, no transfer) and mark the referral rejected (refunded); after it, nothing changes.';

CREATE OR REPLACE FUNCTION billing.first_payment(p_account_id uuid, p_ref text) RETURNS void
LANGUAGE sql AS $$
  SELECT billing.qualify_referral(p_account_id, 'first_payment', p_ref)
$$;
COMMENT ON FUNCTION billing.first_payment(uuid, text) IS
  'A payment was recorded for the account (bundle, top-up or a paid subscription invoice; p_ref its PaymentIntent or invoice id): qualifies its referral when the program counts first payments (only the first does: the referral is claimed once).';

CREATE OR REPLACE FUNCTION api.referrals(p_api_key text, p_session_id uuid, p_public_url text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read');
  u identity.users;
BEGIN
  SELECT * INTO u FROM identity.users WHERE account_id = v_account_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL40C', 'referrals are for people: sign up first');
  END IF;
  PERFORM ledger.refreshed_account(v_account_id);      -- rewards whose holdback ended are spendable now
  RETURN jsonb_build_object(
    'code', u.referral_code,
    'link', rtrim(p_public_url, '/') || '/r/' || u.referral_code,
    'program', (SELECT jsonb_build_object('qualify_on', qualify_on, 'referrer_credits', util.credits(referrer_reward_micros),
                                          'referee_credits', util.credits(referee_reward_micros),
                                          'holdback_days', extract(day FROM holdback)::integer, 'monthly_cap', monthly_cap)
                FROM billing.referral_program),
    'earned', util.credits(coalesce((SELECT sum(l.amount_micros) FROM billing.referrals r
                                     JOIN ledger.credit_lots l ON l.id = r.referrer_lot_id
                                     WHERE r.referrer_account_id = v_account_id AND l.status IN ('active', 'expired')), 0)::bigint),
    'pending', util.credits(coalesce((SELECT sum(l.amount_micros) FROM billing.referrals r
                                      JOIN ledger.credit_lots l ON l.id = r.referrer_lot_id
                                      WHERE r.referrer_account_id = v_account_id AND l.status = 'pending'), 0)::bigint),
    'referrals', coalesce((
      SELECT jsonb_agg(jsonb_build_object(
               'referee', regexp_replace(coalesce(ru.email, 'an anonymous account'), '^(.)[^@]*', '\1***'),
               'status', r.status, 'rejected_reason', r.rejected_reason,
               'credits', util.credits(l.amount_micros), 'credits_status', l.status,
               'available_at', util.iso(l.available_at),
               'signed_up_at', util.iso(r.created_at), 'qualified_at', util.iso(r.qualified_at),
               'rewarded_at', util.iso(r.rewarded_at)) ORDER BY r.created_at DESC)
      FROM billing.referrals r
      LEFT JOIN identity.users ru ON ru.account_id = r.referee_account_id
      LEFT JOIN ledger.credit_lots l ON l.id = r.referrer_lot_id
      WHERE r.referrer_account_id = v_account_id), '[]'));
END $$;
COMMENT ON FUNCTION api.referrals(text, uuid, text) IS
  'GET /v1/referrals: the caller''s referral code and link (p_public_url/r/CODE), the program''s rules, credits earned (spendable) and pending (in the holdback), and each referred account (email masked) with its status (signed_up, qualified, rewarded, rejected and the reason) and its reward. TL40C for accounts without a person (devices, service accounts).';

GRANT EXECUTE ON FUNCTION api.referrals(text, uuid, text) TO pgtally_api;
