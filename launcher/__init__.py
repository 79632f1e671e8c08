"""LLM Parallelism Labs launcher: job + DeepSpeed config + hostfile -> a plan -> ranks."""
