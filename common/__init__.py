"""Shared contracts of the mesh: config, messages, names, transports."""
