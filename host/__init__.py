"""ndpmoe: host package."""
