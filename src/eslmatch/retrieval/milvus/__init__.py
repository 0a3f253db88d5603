"""The Milvus store: a gallery in Milvus collections.

``store`` (:class:`~.store.MilvusStore`: reads, delete, update, compact), ``write`` (the sink,
build, add), ``conn`` (the connection, failures as one line, the manifest property).
"""
