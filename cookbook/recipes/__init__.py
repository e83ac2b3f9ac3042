"""The recipes: `loop.py` is the skeleton they share; each `<name>.py` has `train(run, session, logger)` and reads
top to bottom as its algorithm. The runner imports `cookbook.recipes.<recipe>` by the recipe's name."""
