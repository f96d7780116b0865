"""ndpmoe: model package."""
