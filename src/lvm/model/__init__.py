"""Model side: the vocabulary layout, presets and the LlamaForCausalLM builder."""
