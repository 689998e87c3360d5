"""SUN and QSUN training, task data, evaluation (docs/sun-training.md).

- `sunray.sun.objective`: the SUN loss (prefill module P against the frozen decode module D) and full FT's loss.
- `sunray.sun.train`: `sunray train` (sun, qsun, full, lora-sun): progress, checkpoints, resume, seeds.
- `sunray.sun.tasks`: the generated math / code / tool-calling tasks, their scorers, and the JSONL loader.
- `sunray.sun.evaluate`: accuracy of a (prefill module, decode module) pair through the real engine path.

The accuracy experiment behind `make experiment-accuracy` is a driver: `experiments/accuracy.py`.

Quantization (`sunray.models.quant`), LoRA (`sunray.models.lora`) and the dense attention backend of the training
passes (`sunray.models.dense_attention`) live beside the model: the loader needs the first two to load a quantized
decode module or a LoRA prefill module, and AWQ's calibration runs layers through the third.
"""
