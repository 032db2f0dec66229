"""State that several gateway processes share, in Redis (``[cluster]``): ``accounting`` counts
the queues and slots of every process exactly. Imported only when ``[cluster]`` is set, so a
gateway without it needs no Redis client."""
