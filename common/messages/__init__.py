"""Wire messages of the mesh: frozen structs, one module per direction, one codec.

- ``work``: gateway / batch producers -> encoders (EncodeWork)
- ``handoff``: encoders -> decoders (KvReady)
- ``events``: workers -> the submitter's events queue (EventBatch)
- ``control``: scheduler and gateways -> every worker (ScheduleUpdate, Abort)
- ``status``: workers -> scheduler and observers (WorkerStatus), and store records (LengthSample)
"""
