"""The ap mode: a Dynamo-style store (ring, quorums, vector clocks, hinted handoff,
Merkle-tree anti-entropy, gossip membership).

Entry point: `dynamo.service.create_service(config) -> APService`. Pure protocol pieces
(`ring`, `vclock`, `versions`, `quorum`, `membership`, `gossip`, `merkle`) take time and
membership as arguments; `node` (the replica), `hints`, `antientropy`, `transport`,
`coordinator` and `service` do the I/O. See `DESIGN.md` beside this file.
"""
