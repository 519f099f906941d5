"""When a gate is flagged (``gen/gate_flagged``, the tables' ⚠): the one place these rates are set.

Kept free of torch so that the table command reads them without loading a model library.
"""
MIN_REAL_PASS = 0.8  # share of real LESION pairs the gate must pass at θ
MIN_WRONG_REJECT = 0.5  # share of misplaced / missing real lesions the gate must reject at θ
