"""Slash commands and listeners, one module per part of the flow."""
