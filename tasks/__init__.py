"""Tasks: one module per task, holding its data reading, judge, reward and evaluation (see tasks/pycode.py)."""
