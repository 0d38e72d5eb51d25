-- gpuflops central store, schema version 2 (docs/fleet.md).
-- Applied by `gpuflops central init` in one transaction, as the role that then owns every
-- table and the SECURITY DEFINER functions. Nodes ship as members of gpuflops_ship, which may
-- only INSERT and SELECT: every check and every derived table is kept by the triggers below.

CREATE SCHEMA gpuflops;

CREATE TABLE gpuflops.meta (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO gpuflops.meta VALUES ('schema_version', '2');

-- One row per node ledger (a ledger id is the random id in its genesis record). The public key
-- is registered by the first ship (trust on first use; docs/fleet.md says how to pin keys).
CREATE TABLE gpuflops.ledgers (
    ledger_id uuid PRIMARY KEY,
    node text NOT NULL CHECK (node <> ''),
    cluster text NOT NULL CHECK (cluster <> ''),
    public_key bytea NOT NULL CHECK (length(public_key) = 32),
    registered_at timestamptz NOT NULL DEFAULT now(),
    registered_by name NOT NULL DEFAULT session_user
);

-- The newest rollup of each ledger and the raw record it anchors; written by triggers only.
CREATE TABLE gpuflops.heads (
    ledger_id uuid PRIMARY KEY REFERENCES gpuflops.ledgers,
    seq bigint NOT NULL,
    hash text NOT NULL,
    raw_seq bigint NOT NULL,
    raw_hash text NOT NULL,
    raw_t_s double precision,
    ingested_at timestamptz,
    failed text
);

-- The shipped chain: rollups of the node's raw chain (gpuflops/ledger/rollup.py).
CREATE TABLE gpuflops.records (
    ledger_id uuid NOT NULL REFERENCES gpuflops.ledgers,
    seq bigint NOT NULL CHECK (seq >= 1),
    content text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    sig bytea NOT NULL,
    PRIMARY KEY (ledger_id, seq)
);

-- Derived from the records by the ingest trigger; `gpuflops verify --central` recomputes them.
-- Every column of the node's job_totals (ledger schema v4), bit for bit; seq is the rollup that
-- last wrote the row. Schema v2: hmma_flops and half_rate_fraction, which reconciliation needs.
CREATE TABLE gpuflops.job_totals (
    ledger_id uuid NOT NULL, job text NOT NULL, program text NOT NULL,
    measured_flops double precision NOT NULL, analytic_flops double precision NOT NULL,
    tokens double precision NOT NULL, recompute_flops double precision NOT NULL,
    estimate_t0_s double precision, estimate_t1_s double precision,
    first_t_s double precision, last_t_s double precision,
    seq bigint NOT NULL,
    hmma_flops double precision NOT NULL DEFAULT 0,
    half_rate_fraction double precision,
    PRIMARY KEY (ledger_id, job, program)
);
CREATE INDEX job_totals_program ON gpuflops.job_totals (program);
-- A job's cumulative measured FLOPs after each rollup that touched it, at the rollup's time.
CREATE TABLE gpuflops.job_points (
    ledger_id uuid NOT NULL, job text NOT NULL, program text NOT NULL,
    t_s double precision NOT NULL, seq bigint NOT NULL, measured_flops double precision NOT NULL,
    PRIMARY KEY (ledger_id, job, program, t_s, seq)
);
-- Measured FLOPs per program and hour, for the report's chart (a year is 8,760 rows).
CREATE TABLE gpuflops.program_hours (
    program text NOT NULL, hour bigint NOT NULL, measured_flops double precision NOT NULL,
    PRIMARY KEY (program, hour)
);
CREATE TABLE gpuflops.events (
    ledger_id uuid NOT NULL, raw_seq bigint NOT NULL, kind text NOT NULL, job text NOT NULL,
    program text NOT NULL, t_s double precision NOT NULL, payload jsonb NOT NULL,
    PRIMARY KEY (ledger_id, raw_seq)
);
CREATE INDEX events_program ON gpuflops.events (program);
CREATE TABLE gpuflops.gaps (
    ledger_id uuid NOT NULL, raw_seq bigint NOT NULL, gpu text NOT NULL, uuid text NOT NULL,
    t0_s double precision NOT NULL, t1_s double precision NOT NULL, reason text NOT NULL,
    PRIMARY KEY (ledger_id, raw_seq, gpu, uuid)
);
CREATE INDEX gaps_t1 ON gpuflops.gaps (ledger_id, t1_s);
CREATE TABLE gpuflops.sessions (
    ledger_id uuid NOT NULL, raw_seq bigint NOT NULL, event text NOT NULL,
    t_s double precision NOT NULL, payload jsonb NOT NULL,
    PRIMARY KEY (ledger_id, raw_seq)
);

-- Forks a node reported: the central chain anchors a raw record its local chain does not have.
CREATE TABLE gpuflops.forks (
    id bigserial PRIMARY KEY,
    ledger_id uuid NOT NULL REFERENCES gpuflops.ledgers,
    raw_seq bigint NOT NULL,
    central_hash text NOT NULL,
    local_hash text NOT NULL,
    detail text NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    reported_by name NOT NULL DEFAULT session_user,
    UNIQUE (ledger_id, raw_seq, local_hash)
);

-- People who sign program definitions and decisions (added by the owner only).
CREATE TABLE gpuflops.signers (
    name text PRIMARY KEY CHECK (name <> ''),
    public_key bytea NOT NULL CHECK (length(public_key) = 32),
    added_at timestamptz NOT NULL DEFAULT now(),
    added_by name NOT NULL DEFAULT session_user
);
-- Program definitions and decisions: one signed hash chain per program.
CREATE TABLE gpuflops.journal (
    program text NOT NULL,
    seq bigint NOT NULL CHECK (seq >= 1),
    kind text NOT NULL CHECK (kind IN ('program', 'decision')),
    content text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    signer text NOT NULL REFERENCES gpuflops.signers,
    sig bytea NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    recorded_by name NOT NULL DEFAULT session_user,
    PRIMARY KEY (program, seq)
);
CREATE TABLE gpuflops.journal_heads (
    program text PRIMARY KEY, seq bigint NOT NULL, hash text NOT NULL
);

CREATE FUNCTION gpuflops.ledger_registered() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO gpuflops.heads (ledger_id, seq, hash, raw_seq, raw_hash)
    VALUES (NEW.ledger_id, 0, repeat('0', 64), 0, repeat('0', 64));
    RETURN NEW;
END $$;
CREATE TRIGGER ledgers_head AFTER INSERT ON gpuflops.ledgers
    FOR EACH ROW EXECUTE FUNCTION gpuflops.ledger_registered();

-- Every shipped record is checked here, whoever inserts it: it must follow the ledger's head
-- (seq, prev_hash), hash to what it claims (recomputed here), name its own ledger, node,
-- cluster and seq, and continue the raw range. SQLSTATEs GF001..GF008 name the refusal.
CREATE FUNCTION gpuflops.ingest() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    h record;
    led record;
    c jsonb;
    j jsonb;
    g jsonb;
    gp jsonb;
    t1 double precision;
    prev double precision;
    cur double precision;
BEGIN
    SELECT * INTO h FROM gpuflops.heads WHERE ledger_id = NEW.ledger_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ledger % is not registered', NEW.ledger_id USING ERRCODE = 'GF001';
    END IF;
    IF h.failed IS NOT NULL THEN
        RAISE EXCEPTION 'ledger % is fenced after a fork: %', NEW.ledger_id, h.failed
            USING ERRCODE = 'GF002';
    END IF;
    IF NEW.seq <> h.seq + 1 THEN
        RAISE EXCEPTION 'ledger % ends at seq %: record % refused, only % may follow',
            NEW.ledger_id, h.seq, NEW.seq, h.seq + 1 USING ERRCODE = 'GF003';
    END IF;
    IF NEW.prev_hash <> h.hash THEN
        RAISE EXCEPTION 'ledger % record %: prev_hash does not match the head',
            NEW.ledger_id, NEW.seq USING ERRCODE = 'GF004';
    END IF;
    IF encode(sha256(convert_to(NEW.prev_hash || NEW.content, 'UTF8')), 'hex') <> NEW.hash THEN
        RAISE EXCEPTION 'ledger % record %: hash does not match the content',
            NEW.ledger_id, NEW.seq USING ERRCODE = 'GF005';
    END IF;
    IF length(NEW.sig) <> 64 THEN
        RAISE EXCEPTION 'ledger % record %: no Ed25519 signature', NEW.ledger_id, NEW.seq
            USING ERRCODE = 'GF006';
    END IF;
    c := NEW.content::jsonb;
    SELECT node, cluster INTO led FROM gpuflops.ledgers WHERE ledger_id = NEW.ledger_id;
    IF c->>'kind' IS DISTINCT FROM 'rollup' OR (c->>'seq')::bigint IS DISTINCT FROM NEW.seq
       OR c->>'ledger_id' IS DISTINCT FROM NEW.ledger_id::text
       OR c->>'node' IS DISTINCT FROM led.node OR c->>'cluster' IS DISTINCT FROM led.cluster THEN
        RAISE EXCEPTION 'ledger % record %: content names another seq, ledger, node or cluster',
            NEW.ledger_id, NEW.seq USING ERRCODE = 'GF007';
    END IF;
    IF (c->'raw'->>'first')::bigint IS DISTINCT FROM h.raw_seq + 1
       OR NOT (c->'raw'->>'last')::bigint >= (c->'raw'->>'first')::bigint THEN
        RAISE EXCEPTION 'ledger % record %: raw range %..% does not follow raw seq %',
            NEW.ledger_id, NEW.seq, c->'raw'->>'first', c->'raw'->>'last', h.raw_seq
            USING ERRCODE = 'GF008';
    END IF;
    t1 := coalesce((c->'raw'->>'t1_s')::float8, h.raw_t_s, 0);
    FOR j IN SELECT value FROM jsonb_array_elements(c->'jobs') LOOP
        cur := (j->>2)::float8;
        SELECT measured_flops INTO prev FROM gpuflops.job_totals
            WHERE ledger_id = NEW.ledger_id AND job = j->>0 AND program = j->>1;
        INSERT INTO gpuflops.job_totals VALUES (
            NEW.ledger_id, j->>0, j->>1, cur, (j->>3)::float8, (j->>4)::float8,
            (j->>5)::float8, (j->>6)::float8, (j->>7)::float8, (j->>8)::float8,
            (j->>9)::float8, NEW.seq, coalesce((j->>10)::float8, 0), (j->>11)::float8)
        ON CONFLICT (ledger_id, job, program) DO UPDATE SET
            measured_flops = excluded.measured_flops, analytic_flops = excluded.analytic_flops,
            tokens = excluded.tokens, recompute_flops = excluded.recompute_flops,
            estimate_t0_s = excluded.estimate_t0_s, estimate_t1_s = excluded.estimate_t1_s,
            first_t_s = excluded.first_t_s, last_t_s = excluded.last_t_s, seq = excluded.seq,
            hmma_flops = excluded.hmma_flops, half_rate_fraction = excluded.half_rate_fraction;
        IF cur IS DISTINCT FROM prev THEN
            INSERT INTO gpuflops.job_points VALUES (NEW.ledger_id, j->>0, j->>1, t1, NEW.seq, cur);
            INSERT INTO gpuflops.program_hours VALUES (j->>1, floor(t1 / 3600)::bigint,
                                                       cur - coalesce(prev, 0))
            ON CONFLICT (program, hour) DO UPDATE
                SET measured_flops = gpuflops.program_hours.measured_flops + excluded.measured_flops;
        END IF;
    END LOOP;
    INSERT INTO gpuflops.events
        SELECT NEW.ledger_id, (e->>0)::bigint, e->>1, e->>2, e->>3, (e->>4)::float8, e->5
        FROM jsonb_array_elements(c->'events') AS e;
    FOR g IN SELECT value FROM jsonb_array_elements(c->'gaps') LOOP
        FOR gp IN SELECT value FROM jsonb_array_elements(g->4) LOOP
            INSERT INTO gpuflops.gaps VALUES (NEW.ledger_id, (g->>0)::bigint, gp->>0, gp->>1,
                                              (g->>1)::float8, (g->>2)::float8, g->>3);
        END LOOP;
    END LOOP;
    INSERT INTO gpuflops.sessions
        SELECT NEW.ledger_id, (s->>0)::bigint, s->>1, (s->>2)::float8, s->3
        FROM jsonb_array_elements(c->'sessions') AS s;
    UPDATE gpuflops.heads SET seq = NEW.seq, hash = NEW.hash,
        raw_seq = (c->'raw'->>'last')::bigint, raw_hash = c->'raw'->>'hash',
        raw_t_s = coalesce((c->'raw'->>'t1_s')::float8, raw_t_s), ingested_at = now()
        WHERE ledger_id = NEW.ledger_id;
    RETURN NEW;
END $$;
CREATE TRIGGER records_ingest BEFORE INSERT ON gpuflops.records
    FOR EACH ROW EXECUTE FUNCTION gpuflops.ingest();

-- A node found that the central chain anchors a raw record its own chain does not have (its
-- history was rewritten after shipping, or restored from an older copy): record it and fence
-- the ledger so nothing more is accepted for it until an operator has looked.
CREATE FUNCTION gpuflops.report_fork(p_ledger uuid, p_raw_seq bigint, p_central_hash text,
                                     p_local_hash text, p_detail text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO gpuflops.forks (ledger_id, raw_seq, central_hash, local_hash, detail)
    VALUES (p_ledger, p_raw_seq, p_central_hash, p_local_hash, p_detail)
    ON CONFLICT (ledger_id, raw_seq, local_hash) DO NOTHING;
    UPDATE gpuflops.heads SET failed = coalesce(failed, p_detail) WHERE ledger_id = p_ledger;
END $$;

CREATE FUNCTION gpuflops.journal_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    h record;
    c jsonb;
BEGIN
    INSERT INTO gpuflops.journal_heads VALUES (NEW.program, 0, repeat('0', 64))
        ON CONFLICT (program) DO NOTHING;
    SELECT * INTO h FROM gpuflops.journal_heads WHERE program = NEW.program FOR UPDATE;
    IF NEW.seq <> h.seq + 1 OR NEW.prev_hash <> h.hash THEN
        RAISE EXCEPTION 'journal of % ends at seq %: record % refused', NEW.program, h.seq,
            NEW.seq USING ERRCODE = 'GF003';
    END IF;
    IF encode(sha256(convert_to(NEW.prev_hash || NEW.content, 'UTF8')), 'hex') <> NEW.hash
       OR length(NEW.sig) <> 64 THEN
        RAISE EXCEPTION 'journal of % record %: hash or signature malformed', NEW.program,
            NEW.seq USING ERRCODE = 'GF005';
    END IF;
    c := NEW.content::jsonb;
    IF (c->>'seq')::bigint IS DISTINCT FROM NEW.seq OR c->>'program' IS DISTINCT FROM NEW.program
       OR c->>'kind' IS DISTINCT FROM NEW.kind OR c->>'by' IS DISTINCT FROM NEW.signer THEN
        RAISE EXCEPTION 'journal of % record %: content does not match its columns',
            NEW.program, NEW.seq USING ERRCODE = 'GF007';
    END IF;
    UPDATE gpuflops.journal_heads SET seq = NEW.seq, hash = NEW.hash WHERE program = NEW.program;
    RETURN NEW;
END $$;
CREATE TRIGGER journal_append BEFORE INSERT ON gpuflops.journal
    FOR EACH ROW EXECUTE FUNCTION gpuflops.journal_check();

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA gpuflops FROM PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gpuflops_ship') THEN
        CREATE ROLE gpuflops_ship NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gpuflops_read') THEN
        CREATE ROLE gpuflops_read NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gpuflops_decide') THEN
        CREATE ROLE gpuflops_decide NOLOGIN;
    END IF;
END $$;

GRANT USAGE ON SCHEMA gpuflops TO gpuflops_ship, gpuflops_read, gpuflops_decide;
-- Nodes: append their records and register their ledger; read what they resume from.
GRANT SELECT, INSERT ON gpuflops.ledgers, gpuflops.records TO gpuflops_ship;
GRANT SELECT ON gpuflops.heads, gpuflops.job_totals, gpuflops.meta TO gpuflops_ship;
GRANT EXECUTE ON FUNCTION gpuflops.report_fork(uuid, bigint, text, text, text) TO gpuflops_ship;
-- Reports, gate, verify and `central serve`.
GRANT SELECT ON ALL TABLES IN SCHEMA gpuflops TO gpuflops_read, gpuflops_decide;
-- Program definitions and decisions.
GRANT INSERT ON gpuflops.journal TO gpuflops_decide;
