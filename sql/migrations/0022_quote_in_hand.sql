-- pgtally 0022: metering.quote takes the meter, entitlement and window bounds a batch already holds
-- (sql/functions/40_metering.sql makes the new signature after the migrations). Issue #14.
-- depends: 0021_hot_domains
--
-- The old signature goes, or a call with its seven arguments would be ambiguous between the two.
DROP FUNCTION IF EXISTS metering.quote(identity.accounts, text, bigint, bigint, bigint, timestamptz, bigint);
