"""Our torch implementations, one file per architecture."""
