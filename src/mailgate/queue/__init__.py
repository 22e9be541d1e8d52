"""The durable relay queue and its delivery workers (issue 12)."""
