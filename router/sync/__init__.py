"""Audience sync: a customer-360 query's rows become Klaviyo profiles, and a list that matches the query.

The stages, each a module:

- :mod:`.config`: a ``[[syncs]]`` entry (or the ``sync`` command's arguments) as a :class:`SyncConfig`;
- :mod:`.sources`: streaming readers of CSV, NDJSON (gzip or not), Parquet, and SQL on PostgreSQL,
  SQLite or DuckDB, in batches of plain dicts;
- :mod:`.columns`: which column is which profile attribute, derived from the profile mapping
  (``mappings/klaviyo/profile.json``) so the event transform and the sync share one field table;
- :mod:`.rows`: a row → its key, its checksum and the profile resource, or the reason it is refused;
- :mod:`.convert`: rows to encoded profiles, in a spawned process of their own for big runs;
- :mod:`.state`: per sync and key what was sent (checksum, Klaviyo id, membership, last error), open
  import jobs and the run history, in the queue's database (SQLite or PostgreSQL);
- :mod:`.plan`: pure decisions: new, changed or unchanged; what a mirror removes; the removal guard;
  the time Klaviyo's rate limits imply;
- :mod:`.send`: the Klaviyo side: the list, bulk import jobs followed to their end, their import
  errors, bulk subscribe jobs, profile id look-ups and removals, through the router's client;
- :mod:`.report`: the bad-rows report, Klaviyo's CSV import format, the progress display;
- :mod:`.run`: one run of one sync, from the first read to the summary kept in ``sync-runs``;
- :mod:`.schedule`: the ``[[syncs]]`` that ``serve`` runs on their schedule;
- :mod:`.command`: the ``sync`` and ``sync-runs`` commands.
"""
