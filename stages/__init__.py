"""Pipeline stages: one module per stage, each with a strict typed config and one entry point.

Stages know nothing about YAML or the command line: they take typed configs and objects,
and return typed results. `pipeline/` wires them together.
"""
