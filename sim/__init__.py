"""ndpmoe: sim package."""
