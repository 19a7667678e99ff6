"""Index shard service: packed keys and codes in memory, Redis as the source of truth.

Entry point `python -m copyfree_index` (see __main__.serve); embedded Redis for laptops
and tests in copyfree_index.embedded_redis.
"""

INDEX_SERVICE_NAME = "copyfree.v1.IndexService"
