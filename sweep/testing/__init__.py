"""Test support, kept out of the engine's modules: the fault and stall hooks that the integration tests arm
through the environment (`faults`), and the tiny models built from a config that tests, the demo assets and
the benchmarks train on (`tiny_model`). The engine only calls the hooks, which do nothing unless armed."""
