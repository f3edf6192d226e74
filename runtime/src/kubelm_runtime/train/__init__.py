"""Fine-tuning of causal language models: `kubelm-runtime train`."""
