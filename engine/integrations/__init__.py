"""Adapters that bring the routing policy to the routers operators already run.

Each adapter lives in its own module and imports its router only there, so
``import engine`` never needs an optional dependency:

- ``engine.integrations.litellm``: a LiteLLM ``CustomLogger`` (extra ``session-engine[litellm]``).

docs/integration.md shows each one in use.
"""
