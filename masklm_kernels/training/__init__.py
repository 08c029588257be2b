"""The training command's pieces (`python -m masklm_kernels.train`): data.py (corpus, tokenizer, batches) and
loop.py (model, optimiser, steps, evaluation, checkpoints)."""
