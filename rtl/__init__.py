"""ndpmoe: rtl package."""
