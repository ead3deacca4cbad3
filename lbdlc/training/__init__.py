"""The training protocol of a spec (`train:`): its schema, its checks against the graph.

The generated script itself is written by `lbdlc.backends.train_script`.
"""
