"""Evaluation tools, installed as ``vtprune.evals``: the speed benchmark (``vtprune bench``) and the CLI.

The eval runner (accuracy and cost of every policy side by side) will live here too.
"""
