-- watch_events: what `raydiff watch` did, one row per event, with the run it started.
-- action: resolve_base | list | analyse; outcome: started | complete | failed | recovered | skipped
-- (an analyse not needed: the weights are those of run_id's revision; why in `reason`).
-- An analyse that shows `started` and nothing after it was interrupted (the next tick resumes it).
CREATE OR REPLACE VIEW watch_events AS
SELECT
    e.recorded_at,
    e.watch,
    e.action,
    e.repo,
    e.refs,
    e.revision,
    e.outcome,
    e.run_id,
    r.name AS run_name,
    r.status AS run_status,
    e.attempt,
    e.error,
    e.reason,
    e.retry_at,
    e.seconds,
    e.base,
    e.base_revision,
    e.tick_id,
    e.event_id
FROM raw_watch_event AS e
LEFT JOIN runs AS r ON r.run_id = e.run_id;
