"""Library side of the data-prep jobs: inputs, per-unit processing and the output ledger.

Nothing here imports Ray; the Ray Data pipelines in ``pipelines/`` call into these functions.
"""
