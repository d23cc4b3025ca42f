"""Model side of offramp (needs the `export` extra: torch): build, train and export multi-exit
models into bundles that `server` serves. `vit` (the model), `heads` (exit heads), `data` and
`train` (digits, joint training), `export` (checked ONNX bundle), `demo`, `cli`."""
