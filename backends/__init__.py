"""Graph -> artifact emitters (installed as `lbdlc.backends`).

Each backend owns a table `op name -> emitter`; `tests/test_registry.py` fails when a
registered op lacks an emitter in any backend.
"""
