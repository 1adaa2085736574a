"""Transports behind small ports: a message bus, a key/value store and a KV-cache transport.

Only this package imports aio_pika and redis. ``connect(config, names)`` picks the adapters: the
real broker and store when the config has URLs, in-memory twins (which must be shared by every
service of the process) otherwise.
"""
