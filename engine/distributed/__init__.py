"""The Redis host: shards whose truth is in Redis, committed by one compare-and-set script per
session (redis_commit.lua), and the verification of its streams. Imports the shell and below.
"""
