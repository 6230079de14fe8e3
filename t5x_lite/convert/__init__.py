"""Checkpoint conversion: HF safetensors <-> params pytree (declarative layouts), and our orbax format."""
