"""YAML search spaces shipped with lora-sweep; every file has the same form (see README)."""
