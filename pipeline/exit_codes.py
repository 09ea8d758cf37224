"""Exit codes of the `optg` CLI: a stable contract for release scripts (README, "Artifacts and exit codes")."""
EXIT_OK = 0           # ok
EXIT_ERROR = 1        # anything else
EXIT_USAGE = 2        # config or usage error; unreadable ONNX file for inspect
EXIT_GATE = 3         # a gate failed: accuracy drop, ONNX parity, N:M pattern
EXIT_INTERRUPTED = 130  # Ctrl-C; rerun to resume
