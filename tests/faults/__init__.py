"""Fault injection with real processes: every job gets exactly one outcome, nothing is lost."""
