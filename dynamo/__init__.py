"""The ap mode: a Dynamo-style store (ring, quorums, vector clocks, hinted handoff)."""
