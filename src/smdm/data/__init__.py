"""Tokenizers, text sources and packed token shards."""
