"""Test support that ships with the server: fault injection for fault-tolerance tests (never set in production)."""
