"""Policy plugins: each uses only mailgate.hooks."""
