"""The labs: one module each (fine_tune, simple_model, transfer, tinyllama, rag), the task interface they
implement (tasks/api.py) and their catalogue (tasks/registry.py)."""
