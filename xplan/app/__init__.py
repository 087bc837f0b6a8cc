"""Application layer: code that joins planner, cost models and runtime (the validation harness,
the dry-run comparison, reports). Nothing below it (planner, cost_models, hw_profiles, runtime)
imports from here."""
