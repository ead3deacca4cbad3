"""Graph -> graph transforms over the lbdlc IR (installed as `lbdlc.passes`).

The pass manager, canonicalisation and fusion passes land with issue [5/10]; this package
is their home so that every backend benefits from every pass.
"""
