"""Layer 7 — repair: what can be done about Signal Degradation, and what it costs.

- :mod:`~mechq.repair.protect`: modules kept at higher precision (GPTQModel ``dynamic`` rules);
- :mod:`~mechq.repair.amplify`: reading out the peak intermediate signal;
- :mod:`~mechq.repair.eora`: low-rank error compensation (EoRA);
- :mod:`~mechq.repair.adapter`: an EoRA correction written as (and read from) a PEFT LoRA adapter;
- :mod:`~mechq.repair.table`: the repair table (paper Table 1);
- :mod:`~mechq.repair.allocation`: widths per module under a bit budget (multiple-choice knapsack);
- :mod:`~mechq.repair.recipe`: a mixed-precision recipe within a bit budget;
- :mod:`~mechq.repair.smoothquant`: SmoothQuant's migration of activation outliers into weights.
"""
