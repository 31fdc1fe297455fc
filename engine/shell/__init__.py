"""The actor shell: shard actors, the runtime that routes events to them, the clock, replies, capacity
and the guard around code the engine runs but does not own. Imports the log and the core.
"""
