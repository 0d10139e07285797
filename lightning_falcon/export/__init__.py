"""The export layer: a trained adapter shipped as it is, merged into its base, or as one GGUF file for llama.cpp.

- `run.py`: `export`, the steps `python -m lightning_falcon export` takes: check the request, merge, write.
- `merge.py`: LoRA merged into the 4-bit base as trained, one layer dequantized at a time.
- `gguf.py`: a merged Falcon written as one GGUF file, as llama.cpp's Falcon loader reads it.
- `modelfile.py`: the Ollama Modelfile beside the GGUF: training's prompt template and stop token.

It reads the adapter directory a fit wrote (`model/adapter.py`) and never imports the training layer.
"""
