"""Small helpers every entry point shares: logging with redaction, `.env` reading, atomic files."""
