"""The durable outbound queue (the queue helper's version of this file replaces this one)."""
