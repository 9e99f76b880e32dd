"""The control plane on FastAPI: keys, users, info, cost, model admin, health, docs and the Key
Manager pages. Low traffic; the inference hot path never enters it (router/app.py dispatches
the hot path first)."""
