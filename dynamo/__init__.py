"""The ap mode: a Dynamo-style store (ring, quorums, vector clocks, hinted handoff).

Entry point: `dynamo.service.create_service(config) -> APService`. Pure protocol pieces
(`ring`, `vclock`, `versions`, `quorum`, `membership`) take time and membership as
arguments; `node` (the replica), `hints`, `transport`, `coordinator` and `service` do the
I/O. See `DESIGN.md` beside this file.
"""
