"""The file store: a gallery folder (FAISS first stage, memory-mapped shards, a SQLite catalogue).

``store`` (build, add, delete, update; :class:`~.store.FileStore`), ``reader`` (snapshots,
first stage, records), ``commit`` (lock, commits, garbage), ``compact`` (compact, reindex),
``catalog`` (SQLite items, fields, state), ``shards`` (resumable shard writes), ``upgrade``
(formats 1-3 -> 4). Shared with the rest of ``retrieval``: ``layout.py`` (names, arrays) and
``ann.py`` (FAISS).
"""
