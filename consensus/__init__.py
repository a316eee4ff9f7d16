"""The cp mode: a Raft-replicated, linearizable store on pysyncobj."""
