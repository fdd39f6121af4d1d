"""The flagship run: triage, RLM over a long incident log, numpy analytics, history."""
