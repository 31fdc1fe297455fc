"""The audit log: its writer, segments and hash chain, restart recovery, replay and file verification.

It imports the core and nothing above it.
"""
