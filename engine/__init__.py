"""The inference engine: our own torch models, batched KV cache, hand-off."""
