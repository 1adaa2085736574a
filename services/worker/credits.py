"""WAA back-pressure: decode slots that decoders grant and encoders take, counted in the store.

One integer per schedule version (``names.credits(version)``): a decoder adds its free slots when
it takes the role (B_D minus what it runs or holds) and one slot per request that leaves its batch;
an encoder takes slots before it encodes, at most what it may encode, and gives back what it did
not use (and the slots of requests that finished at prefill). So the hand-offs in flight never
exceed the decoders' free slots, however many encoders run. A new version starts a new count (it
follows every change of roles), so slots lost with a worker that died are not carried over.
"""

from __future__ import annotations

from common.names import CREDITS_TTL_S, Names
from common.transport.port import Store


class Credits:
    def __init__(self, store: Store, names: Names) -> None:
        self.store, self.names = store, names

    async def grant(self, version: int, slots: int) -> None:
        if slots:
            await self.store.add(self.names.credits(version), slots, ttl_s=CREDITS_TTL_S)

    async def take(self, version: int, up_to: int) -> int:
        return await self.store.take(self.names.credits(version), up_to) if up_to > 0 else 0

    async def available(self, version: int) -> int:
        value = await self.store.get(self.names.credits(version))
        return int(value) if value is not None else 0
