"""Model side of offramp (needs the `export` extra: torch): build, train and export multi-exit
models into bundles that `server` serves. `vit` (the model), `heads` (exit heads: linear, LGViT,
DMPO, PALBERT and JEI-DNN gates, MuE's shared classifier), `recipes` (the literature's tuning
recipes), `data` and `train` (digits, digits-hard, training loops), `export` (checked ONNX
bundle), `demo`, `compare` (recipe x head comparison), `cli`."""
