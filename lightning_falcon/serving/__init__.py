"""`serve`: the OpenAI API and a chat page over one 4-bit base with several LoRA adapters."""
