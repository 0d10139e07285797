"""The export layer: a trained adapter shipped as it is, merged into its base, or as one GGUF file for llama.cpp.

- `run.py`: `export`, the steps `python -m lightning_falcon export` takes: check the request, merge, write.
- `merge.py`: LoRA merged into the 4-bit base as trained, one layer dequantized at a time.
- `gguf.py`: a merged model written as one GGUF file for llama.cpp: what every architecture shares (vocabulary,
  pre-tokenizer, tensor types, the two-pass write), and the table's llama.cpp architecture choosing the writer.
- `gguf_falcon.py`, `gguf_llama.py`, `gguf_falcon_h1.py`: each llama.cpp architecture's metadata and tensors
  (Falcon; Falcon3 as `llama`; Falcon-H1 as `falcon-h1`, its μP multipliers folded into the weights).
- `modelfile.py`: the Ollama Modelfile beside the GGUF: training's prompt template and stop token.

It reads the adapter directory a fit wrote (`model/adapter.py`) and never imports the training layer.
"""
