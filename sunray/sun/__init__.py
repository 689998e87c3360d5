"""SUN and QSUN training, task data, evaluation (DESIGN.md §1).

- `sunray.sun.attention`: a differentiable dense attention backend for the training passes.
- `sunray.sun.objective`: the SUN loss (prefill module P against the frozen decode module D) and full FT's loss.
- `sunray.sun.train`: `sunray train` (sun, qsun, full, lora-sun): progress, checkpoints, resume, seeds.
- `sunray.sun.tasks`: the generated math / code / tool-calling tasks, their scorers, and the JSONL loader.
- `sunray.sun.evaluate`: accuracy of a (prefill module, decode module) pair through the real engine path.

The accuracy experiment behind `make experiment-accuracy` is a driver: `experiments/accuracy.py`.

Quantization (`sunray.models.quant`) and LoRA (`sunray.models.lora`) live beside the model, because the loader
needs them to load a quantized decode module or a LoRA prefill module.
"""
