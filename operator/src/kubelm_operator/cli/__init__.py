"""The `kubelm` command: one screen for training and serving, reasons in plain words, prompts and logs.

`cluster` is the command's only door to the Kubernetes API; `summary` and `explain` are pure (objects in,
rows and sentences out), so the words a user reads are tested without a cluster.
"""
