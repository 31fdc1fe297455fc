"""The pure core: the transitions, the routing rules, entries, config, tenant scope, the backend URL.

It imports only ``events`` and the standard library (``make lint`` checks it): no clock, no lock, no
file, no actor. Every host (the shard actors, the Redis host, replay, the backtest) runs this code.
"""
