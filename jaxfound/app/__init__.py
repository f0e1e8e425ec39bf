"""The drivers: one module per verb family, each a function the CLI calls. The only place with side effects beyond a
run dir: registry hooks, reports, printed tables."""
