"""Automatic calibration (docs/design.md section 4): key-frequency selection (``selection``), the settings and
the result file (``settings``, ``result``), the score cache (``cache``), scoring a candidate table
(``scoring``), the decision rule (``stats``), the sweeps (``sweep``), the report (``report``), the whole run
(``calibrate``), and what ``dpe-gguf convert`` writes when it is given no divisors (``choose``)."""
