"""The demo's config, data and tiny model (`sweep demo`), shipped as package data of lora_sweep."""
