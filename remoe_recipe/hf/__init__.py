"""Hugging Face interop: state-dict conversion, exported configuration, remote code, tokenizer files."""
