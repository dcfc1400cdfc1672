"""Example web apps using tiered_sessions' middleware (imported by the tests)."""
