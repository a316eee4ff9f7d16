"""History checkers, as Jepsen uses them: record what concurrent clients saw, then judge it.

- `history`: one operation per JSON line (`Op`), a thread-safe `HistoryRecorder`, load/save.
- `linearizability`: a Wing-Gong / Lowe search (with Knossos' treatment of indeterminate
  operations) that decides whether a key-value history is linearizable, key by key.
- `revisions`: cheap global checks on etcd-style revisions that the per-key search cannot
  see (two writes with one revision, a read that saw the store go backwards).
- `ap_checker`: lost writes, resurrections and convergence for ap (Dynamo-style)
  histories in the same format (kept by the ap mode's engineer).

`python -m clusters.checkers.linearizability HISTORY.jsonl` prints the verdict on a saved history.
"""
