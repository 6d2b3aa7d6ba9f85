"""kcore."""
