"""Providers: the prefix-cache TTL of each, and the provider a model id names (the seed's rules)."""

from __future__ import annotations

__all__ = ["DEFAULT_CACHE_TTL_MS", "cache_ttl_for_provider", "provider_from_model"]

DEFAULT_CACHE_TTL_MS = 300_000
_CACHE_TTL_MS = {
    "anthropic": 300_000,
    "openai": 300_000,
    "deepseek": 300_000,
    "google": 300_000,
    "groq": 300_000,
    "vllm": 600_000,
    "dosrouter": 600_000,
}

def cache_ttl_for_provider(provider: str) -> int:
    """Prefix-cache TTL in milliseconds for a provider name."""
    return _CACHE_TTL_MS.get(provider, DEFAULT_CACHE_TTL_MS)


def provider_from_model(model_id: str) -> str:
    """"anthropic/claude-sonnet-4.6" -> "anthropic"; "gpt-4o" or "/x" -> "default"."""
    slash = model_id.find("/")
    return model_id[:slash] if slash > 0 else "default"
